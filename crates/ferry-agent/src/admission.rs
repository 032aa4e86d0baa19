//! Limits on what the network can make this agent hold: data-plane handshakes in flight
//! per address (anyone can start one) and open data-plane connections per agent (only
//! mesh agents get that far). Each slot is a guard given back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Handshakes in flight from one address.
pub const HANDSHAKES_PER_ADDRESS: usize = 16;
/// Handshakes in flight from everyone.
pub const HANDSHAKES_TOTAL: usize = 256;
/// Open data-plane connections from one agent (a migration uses one; probes and cold
/// copies one each).
pub const CONNECTIONS_PER_AGENT: usize = 16;

/// Counters per key, with a limit per key and a total.
#[derive(Debug)]
struct Counter<K> {
    counts: Mutex<HashMap<K, usize>>,
    per_key: usize,
    total: usize,
}

impl<K: std::hash::Hash + Eq + Clone> Counter<K> {
    fn new(per_key: usize, total: usize) -> Arc<Self> {
        Arc::new(Counter {
            counts: Mutex::new(HashMap::new()),
            per_key,
            total,
        })
    }

    fn take(self: &Arc<Self>, key: K) -> Option<Slot<K>> {
        let mut m = self.counts.lock().ok()?;
        let all: usize = m.values().sum();
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= self.per_key || all >= self.total {
            if *n == 0 {
                m.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            counter: self.clone(),
            key,
        })
    }

    fn give_back(&self, key: &K) {
        if let Ok(mut m) = self.counts.lock() {
            if let Some(n) = m.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    m.remove(key);
                }
            }
        }
    }

    fn held(&self, key: &K) -> usize {
        self.counts
            .lock()
            .map(|m| m.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// One counted handshake or connection; given back when dropped.
#[derive(Debug)]
pub struct Slot<K: std::hash::Hash + Eq + Clone> {
    counter: Arc<Counter<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        self.counter.give_back(&self.key);
    }
}

/// The data plane's limits.
#[derive(Debug)]
pub struct ConnectionLimits {
    handshakes: Arc<Counter<IpAddr>>,
    connections: Arc<Counter<String>>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshakes: Counter::new(HANDSHAKES_PER_ADDRESS, HANDSHAKES_TOTAL),
            connections: Counter::new(CONNECTIONS_PER_AGENT, usize::MAX),
        }
    }
}

impl ConnectionLimits {
    /// A handshake from `ip`, if within the limits.
    pub fn handshake(&self, ip: IpAddr) -> Option<Slot<IpAddr>> {
        self.handshakes.take(ip)
    }

    /// An open connection from agent `name`, if within the limit.
    pub fn connection(&self, name: &str) -> Option<Slot<String>> {
        self.connections.take(name.to_string())
    }

    /// Handshakes in flight from `ip`.
    pub fn handshakes_from(&self, ip: IpAddr) -> usize {
        self.handshakes.held(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_limited_per_address_and_given_back() {
        let l = ConnectionLimits::default();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let held: Vec<_> = (0..HANDSHAKES_PER_ADDRESS)
            .map(|_| l.handshake(a).expect("within the limit"))
            .collect();
        assert!(l.handshake(a).is_none(), "one more from the same address");
        assert!(l.handshake(b).is_some(), "another address is not held up");
        assert_eq!(l.handshakes_from(a), HANDSHAKES_PER_ADDRESS);
        drop(held);
        assert_eq!(l.handshakes_from(a), 0);
        assert!(l.handshake(a).is_some());
    }

    #[test]
    fn connections_are_limited_per_agent() {
        let l = ConnectionLimits::default();
        let held: Vec<_> = (0..CONNECTIONS_PER_AGENT)
            .map(|_| l.connection("kvm1").expect("within the limit"))
            .collect();
        assert!(l.connection("kvm1").is_none());
        assert!(l.connection("kvm2").is_some());
        drop(held);
        assert!(l.connection("kvm1").is_some());
    }

    #[test]
    fn the_total_caps_many_addresses() {
        let c = Counter::new(2, 3);
        let _x = c.take(1u8).expect("1");
        let _y = c.take(2u8).expect("2");
        let _z = c.take(3u8).expect("3");
        assert!(c.take(4u8).is_none(), "total reached");
    }
}
