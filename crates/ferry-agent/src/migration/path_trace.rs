//! A trace of the data plane's path while pre-copy runs: congestion window, RTT, what
//! went out and what was lost, every [`TRACE_EVERY`]. Only when its target is enabled at
//! debug level (`RUST_LOG=info,ferry_agent::migration::path_trace=debug`): it is for
//! reading how the congestion controller meets the link, not for production logs.

use std::time::{Duration, Instant};
use tracing::debug;

/// Sampling period: a few per round trip on the testbed's `wan` (20 ms).
pub const TRACE_EVERY: Duration = Duration::from_millis(10);

/// Aborts the sampling task when dropped (the round loop's scope).
pub struct PathTrace(Option<tokio::task::JoinHandle<()>>);

impl PathTrace {
    /// Starts sampling `conn` if this module's debug level is enabled; else does nothing.
    pub fn start(conn: &quinn::Connection, migration: &str) -> PathTrace {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return PathTrace(None);
        }
        let (conn, id) = (conn.clone(), migration.to_string());
        PathTrace(Some(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut last = conn.stats();
            let mut tick = tokio::time::interval(TRACE_EVERY);
            loop {
                tick.tick().await;
                let s = conn.stats();
                let (p, q) = (&s.path, &last.path);
                debug!(
                    migration = %id,
                    t_ms = t0.elapsed().as_millis() as u64,
                    cwnd_kb = p.cwnd / 1000,
                    rtt_us = p.rtt.as_micros() as u64,
                    min_rtt_us = p.min_rtt.as_micros() as u64,
                    sent_kb = s.udp_tx.bytes.saturating_sub(last.udp_tx.bytes) / 1000,
                    lost = p.lost_packets.saturating_sub(q.lost_packets),
                    events = p.congestion_events.saturating_sub(q.congestion_events),
                    "path"
                );
                last = s;
            }
        })))
    }
}

impl Drop for PathTrace {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}
