//! What the server allows one client address: open connections, and requests with a missing or
//! wrong token.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The address a client is counted by: an IPv4 address, or the /64 network of an IPv6 one (a
/// host usually has a /64 of its own to pick addresses from). IPv4-mapped IPv6 addresses count
/// as the IPv4 address.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug)]
struct Peer {
    conns: usize,
    /// Unauthorized requests it may still make, refilled continuously.
    budget: f64,
    at: Instant,
}

/// Per-client accounting, shared by the accept loop and the requests.
#[derive(Debug)]
pub(crate) struct Peers {
    max_conns: usize,
    per_minute: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    peers: HashMap<IpAddr, Peer>,
    /// The map is pruned when it reaches this size.
    prune_at: usize,
}

const PRUNE_MIN: usize = 1024;

impl Peers {
    pub(crate) fn new(max_conns: usize, unauthorized_per_minute: u32) -> Self {
        Self {
            max_conns,
            per_minute: f64::from(unauthorized_per_minute),
            state: Mutex::new(State {
                peers: HashMap::new(),
                prune_at: PRUNE_MIN,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refill(&self, p: &mut Peer, now: Instant) {
        let elapsed = now.saturating_duration_since(p.at).as_secs_f64();
        p.budget = (p.budget + elapsed * self.per_minute / 60.0).min(self.per_minute);
        p.at = now;
    }

    /// A connection from `key` (see [`client_key`]), unless it has `max_conns` open already.
    pub(crate) fn connect(self: &Arc<Self>, key: IpAddr) -> Option<PeerSlot> {
        let now = Instant::now();
        let mut st = self.state();
        if st.peers.len() >= st.prune_at {
            // Forget the clients with nothing open and a full budget.
            let per_minute = self.per_minute;
            st.peers.retain(|_, p| {
                let elapsed = now.saturating_duration_since(p.at).as_secs_f64();
                p.conns > 0 || p.budget + elapsed * per_minute / 60.0 < per_minute
            });
            st.prune_at = (st.peers.len() * 2).max(PRUNE_MIN);
        }
        let peer = st.peers.entry(key).or_insert(Peer {
            conns: 0,
            budget: self.per_minute,
            at: now,
        });
        if peer.conns >= self.max_conns {
            return None;
        }
        peer.conns += 1;
        Some(PeerSlot {
            peers: Arc::clone(self),
            key,
        })
    }

    /// How long until `key` may make an unauthorized request again; `None`: now.
    pub(crate) fn limited(&self, key: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut st = self.state();
        let p = st.peers.get_mut(&key)?;
        self.refill(p, now);
        (p.budget < 1.0).then(|| Duration::from_secs_f64((1.0 - p.budget) * 60.0 / self.per_minute))
    }

    /// Counts an unauthorized request of `key`.
    pub(crate) fn unauthorized(&self, key: IpAddr) {
        let now = Instant::now();
        let mut st = self.state();
        let per_minute = self.per_minute;
        let p = st.peers.entry(key).or_insert(Peer {
            conns: 0,
            budget: per_minute,
            at: now,
        });
        self.refill(p, now);
        p.budget = (p.budget - 1.0).max(0.0);
    }
}

/// An open connection of a client; counted until dropped.
#[derive(Debug)]
pub(crate) struct PeerSlot {
    peers: Arc<Peers>,
    key: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut st = self.peers.state();
        let per_minute = self.peers.per_minute;
        if let Some(p) = st.peers.get_mut(&self.key) {
            p.conns = p.conns.saturating_sub(1);
            let elapsed = now.saturating_duration_since(p.at).as_secs_f64();
            if p.conns == 0 && p.budget + elapsed * per_minute / 60.0 >= per_minute {
                st.peers.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn connections_per_client_are_capped_and_freed() {
        let peers = Arc::new(Peers::new(2, 30));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = peers.connect(ip).unwrap();
        let _b = peers.connect(ip).unwrap();
        assert!(peers.connect(ip).is_none());
        assert!(peers.connect("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(peers.connect(ip).is_some());
    }

    #[test]
    fn unauthorized_requests_spend_a_budget_that_outlives_the_connection() {
        let peers = Arc::new(Peers::new(10, 3));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            let slot = peers.connect(ip).unwrap();
            assert_eq!(peers.limited(ip), None);
            peers.unauthorized(ip);
            drop(slot);
        }
        let wait = peers.limited(ip).expect("budget spent");
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(peers.limited("10.0.0.2".parse().unwrap()), None);
    }
}
