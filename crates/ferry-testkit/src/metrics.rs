//! Reading an agent's Prometheus endpoint the way Prometheus does.

use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::time::Duration;

/// `GET /metrics` over a plain TCP connection to `addr` (what curl or Prometheus does):
/// the whole HTTP response, status line included.
pub fn scrape_metrics(addr: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        bail!(
            "GET /metrics on {addr}: {}",
            out.lines().next().unwrap_or("")
        );
    }
    Ok(out)
}

/// Sum of a metric's samples whose line starts with `prefix` (name plus labels).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
