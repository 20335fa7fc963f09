//! `/metrics` in the Prometheus text format.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::store::Store;

/// The server's metrics: request counts and latencies here, lock gauges and counters read from
/// the store at each scrape.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub(crate) connections: Gauge,
    pub(crate) rejected_connections: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: u16,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~100 s: loopback lock requests up to capped long polls.
    Histogram::new(exponential_buckets(0.000_05, 4.0, 12))
}

#[derive(Debug)]
struct StoreCollector(Arc<dyn Store>);

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.stats();
        let gauges = [
            (
                "lockgate_locks_held",
                "Locks with at least one holder",
                s.locks_held,
            ),
            (
                "lockgate_leases_held",
                "Leases held (each shared holder counts)",
                s.leases,
            ),
            (
                "lockgate_waiters",
                "Queued acquirers: open long polls and pollers keeping a place",
                s.waiters,
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters = [
            ("lockgate_grants", "Leases granted", s.grants),
            ("lockgate_releases", "Leases released", s.releases),
            (
                "lockgate_lease_expiries",
                "Leases dropped because they were not renewed within the TTL",
                s.lease_expiries,
            ),
            (
                "lockgate_queue_place_expiries",
                "Queue places dropped because their poller stopped asking",
                s.place_expiries,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

impl Metrics {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let connections = Gauge::default();
        let rejected_connections = Counter::default();
        registry.register(
            "lockgate_http_requests",
            "HTTP requests by endpoint, status and lockgate error code",
            requests.clone(),
        );
        registry.register(
            "lockgate_http_request_duration_seconds",
            "HTTP request latency by endpoint (long-poll acquisitions include their wait)",
            latency.clone(),
        );
        registry.register(
            "lockgate_http_connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "lockgate_http_rejected_connections",
            "Connections closed at once because the connection cap was reached",
            rejected_connections.clone(),
        );
        registry.register_collector(Box::new(StoreCollector(store)));
        Self {
            registry,
            requests,
            latency,
            connections,
            rejected_connections,
        }
    }

    pub(crate) fn observe(
        &self,
        endpoint: &'static str,
        status: u16,
        code: &'static str,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                status,
                code,
            })
            .inc();
        self.latency
            .get_or_create(&EndpointLabels { endpoint })
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
