//! Lease timing.

use std::time::Duration;

use crate::error::Error;

/// Lease timing. The defaults are Go lockgate's: a lease lives 10 s and is renewed every 3 s.
///
/// The rules a configuration must satisfy (checked when a locker is made):
///
/// - `1 s ≤ renew_period < renew_deadline` and `renew_deadline + 1 s ≤ ttl`: a holder is told
///   its lease is lost (at the latest `renew_deadline` after its last confirmed renewal was
///   sent) at least a second before anyone may take the lock over (`ttl` after that send at
///   the earliest); Go peers read `ExpireAtTimestamp` in whole seconds, hence the second.
/// - `0 < request_timeout ≤ renew_deadline − renew_period`: a renewal sent when it is due is
///   answered, or given up, before the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a record may stay unchanged before a waiter may take the lock over. Every
    /// participant must use the same TTL (Go lockgate's is 10 s).
    pub ttl: Duration,
    /// How often a holder renews its leases (one write per object for all of them).
    pub renew_period: Duration,
    /// How long after the last confirmed renewal was sent a holder counts its lease as lost,
    /// whatever the network does. The difference to `ttl` is the time the holder has to stop
    /// acting before another process may take over.
    pub renew_deadline: Duration,
    /// Timeout of every API request.
    pub request_timeout: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            renew_period: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(8),
            request_timeout: Duration::from_secs(3),
        }
    }
}

impl LeaseConfig {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let second = Duration::from_secs(1);
        let ok = self.renew_period >= second
            && self.renew_period < self.renew_deadline
            && self.renew_deadline + second <= self.ttl
            && !self.request_timeout.is_zero()
            && self.request_timeout <= self.renew_deadline - self.renew_period;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig(format!(
                "lease timing must satisfy 1s <= renew_period < renew_deadline <= ttl - 1s and \
                 0 < request_timeout <= renew_deadline - renew_period; got {self:?}"
            )))
        }
    }

    /// The TTL in whole seconds, rounded up (records count seconds).
    pub(crate) fn ttl_secs(&self) -> i64 {
        i64::try_from(self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0))
            .unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid_and_bad_timings_are_refused() {
        LeaseConfig::default().validate().unwrap();
        let s = Duration::from_secs;
        for bad in [
            LeaseConfig {
                renew_deadline: s(10),
                ..Default::default()
            },
            LeaseConfig {
                renew_period: s(8),
                ..Default::default()
            },
            LeaseConfig {
                request_timeout: s(6),
                ..Default::default()
            },
            LeaseConfig {
                request_timeout: Duration::ZERO,
                ..Default::default()
            },
            LeaseConfig {
                renew_period: Duration::from_millis(500),
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert_eq!(
            LeaseConfig {
                ttl: Duration::from_millis(4500),
                ..Default::default()
            }
            .ttl_secs(),
            5
        );
    }
}
