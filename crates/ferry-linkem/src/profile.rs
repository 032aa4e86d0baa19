//! Link profiles (`lan`, `dc`, `wan`, `far`, custom) and the parsing of rates, durations
//! and loss probabilities.

use std::fmt;

/// Largest packet the emulator handles (a TSO/USO super-packet of 64 KiB plus headers).
pub const MAX_PACKET: usize = 65536 + 64;

/// What one direction of a link does to packets. The RTT is split half per direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// Bottleneck rate in bits/s; `None` is unlimited (no pacing, no queue).
    pub rate_bps: Option<u64>,
    /// Round-trip time in nanoseconds; each direction delays packets by half of it.
    pub rtt_ns: u64,
    /// Probability that one segment (one MTU-sized packet on a real wire) is lost.
    pub loss: f64,
    /// Queue limit in bytes; `None` is one bandwidth-delay product (see [`LinkSpec::queue_limit`]).
    pub queue_bytes: Option<u64>,
}

impl LinkSpec {
    /// No shaping at all.
    pub const LAN: LinkSpec = LinkSpec {
        rate_bps: None,
        rtt_ns: 0,
        loss: 0.0,
        queue_bytes: None,
    };

    /// A named profile: `lan`, `dc`, `wan`, `far`.
    pub fn profile(name: &str) -> Option<LinkSpec> {
        let ms = 1_000_000u64;
        Some(match name {
            "lan" => LinkSpec::LAN,
            "dc" => LinkSpec {
                rate_bps: Some(10_000_000_000),
                rtt_ns: ms / 2,
                loss: 0.0,
                queue_bytes: None,
            },
            "wan" => LinkSpec {
                rate_bps: Some(1_000_000_000),
                rtt_ns: 20 * ms,
                loss: 0.0,
                queue_bytes: None,
            },
            "far" => LinkSpec {
                rate_bps: Some(200_000_000),
                rtt_ns: 50 * ms,
                loss: 0.001,
                queue_bytes: None,
            },
            _ => return None,
        })
    }

    /// Names accepted by [`LinkSpec::profile`].
    pub const PROFILES: [&'static str; 4] = ["lan", "dc", "wan", "far"];

    /// One-way delay: half the RTT.
    pub fn one_way_delay_ns(&self) -> u64 {
        self.rtt_ns / 2
    }

    /// Whether packets pass untouched (no rate, no delay, no loss).
    pub fn is_transparent(&self) -> bool {
        self.rate_bps.is_none() && self.rtt_ns == 0 && self.loss == 0.0
    }

    /// Queue limit in bytes: the configured one, or one bandwidth-delay product
    /// (rate × RTT), but never less than two maximal packets so a 64 KiB super-packet can
    /// always enter an empty queue. Unlimited without a rate.
    pub fn queue_limit(&self) -> u64 {
        match (self.queue_bytes, self.rate_bps) {
            (Some(q), _) => q,
            (None, None) => u64::MAX,
            (None, Some(rate)) => {
                let bdp = (rate as u128 * self.rtt_ns as u128 / 8 / 1_000_000_000) as u64;
                bdp.max(2 * MAX_PACKET as u64)
            }
        }
    }

    /// Applies `key=value` overrides separated by commas (`rate=500mbit,rtt=10ms,loss=0.01,queue=1000000`),
    /// or a profile name. Used for `--link A,B=SPEC`.
    pub fn parse_spec(text: &str) -> Result<LinkSpec, String> {
        if let Some(p) = LinkSpec::profile(text) {
            return Ok(p);
        }
        let mut spec = LinkSpec::LAN;
        for part in text.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!(
                    "'{part}' is neither a profile ({}) nor key=value",
                    LinkSpec::PROFILES.join(", ")
                )
            })?;
            match k {
                "profile" => {
                    spec = LinkSpec::profile(v).ok_or_else(|| format!("unknown profile '{v}'"))?
                }
                "rate" => spec.rate_bps = parse_rate(v)?,
                "rtt" => spec.rtt_ns = parse_duration_ns(v)?,
                "loss" => spec.loss = parse_loss(v)?,
                "queue" => spec.queue_bytes = Some(parse_bytes(v)?),
                _ => {
                    return Err(format!(
                        "unknown link key '{k}' (rate, rtt, loss, queue, profile)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rate_bps {
            None => write!(f, "rate unlimited")?,
            Some(r) => write!(f, "rate {}", format_rate(r))?,
        }
        write!(
            f,
            ", rtt {} ms, loss {}%",
            self.rtt_ns as f64 / 1e6,
            self.loss * 100.0
        )?;
        if self.rate_bps.is_some() {
            write!(f, ", queue {} B", self.queue_limit())?;
        }
        Ok(())
    }
}

/// `1 Gbit/s`, `200 Mbit/s`, ...
pub fn format_rate(bps: u64) -> String {
    let b = bps as f64;
    if b >= 1e9 {
        format!("{} Gbit/s", b / 1e9)
    } else if b >= 1e6 {
        format!("{} Mbit/s", b / 1e6)
    } else if b >= 1e3 {
        format!("{} kbit/s", b / 1e3)
    } else {
        format!("{bps} bit/s")
    }
}

fn split_number(text: &str) -> Result<(f64, String), String> {
    let t = text.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{text}': expected a number with a unit"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("'{text}': must be a non-negative number"));
    }
    Ok((n, unit.trim().to_ascii_lowercase()))
}

/// Parses a rate in bits per second: `500mbit`, `1gbit`, `10Gbit/s`, `200m`, `64kbit`,
/// `1000000` (bits/s). `0`, `none` and `unlimited` mean no rate limit.
pub fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim().to_ascii_lowercase();
    if t == "none" || t == "unlimited" {
        return Ok(None);
    }
    let (n, unit) = split_number(&t)?;
    let unit = unit.strip_suffix("/s").unwrap_or(&unit);
    let mult = match unit {
        "" | "bit" => 1.0,
        "k" | "kbit" => 1e3,
        "m" | "mbit" => 1e6,
        "g" | "gbit" => 1e9,
        "t" | "tbit" => 1e12,
        _ => {
            return Err(format!(
                "'{text}': unknown rate unit '{unit}' (use bit, kbit, mbit, gbit: bits per second)"
            ))
        }
    };
    let bps = (n * mult).round() as u64;
    Ok(if bps == 0 { None } else { Some(bps) })
}

/// Parses a duration: `20ms`, `0.5ms`, `250us`, `1s`, `0`.
pub fn parse_duration_ns(text: &str) -> Result<u64, String> {
    let (n, unit) = split_number(text)?;
    let mult = match unit.as_str() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "" if n == 0.0 => 0.0,
        _ => return Err(format!("'{text}': give a unit (ns, us, ms, s)")),
    };
    Ok((n * mult).round() as u64)
}

/// Parses a loss probability: `0.01` (1%) or `1%`.
pub fn parse_loss(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let p = if let Some(pct) = t.strip_suffix('%') {
        pct.trim()
            .parse::<f64>()
            .map_err(|_| format!("'{text}': not a percentage"))?
            / 100.0
    } else {
        t.parse::<f64>()
            .map_err(|_| format!("'{text}': not a probability (0.01 or 1%)"))?
    };
    if !(0.0..=1.0).contains(&p) {
        return Err(format!(
            "'{text}': loss must be between 0 and 1 (or 0% and 100%)"
        ));
    }
    Ok(p)
}

/// Parses a byte count: `1000000`, `512k`, `2m` (powers of 1024 with k/m/g suffixes).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let (n, unit) = split_number(text)?;
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("'{text}': unknown size unit '{unit}'")),
    };
    Ok((n * mult).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_profiles() {
        let wan = LinkSpec::profile("wan").unwrap();
        assert_eq!(wan.rate_bps, Some(1_000_000_000));
        assert_eq!(wan.one_way_delay_ns(), 10_000_000);
        assert_eq!(wan.queue_limit(), 2_500_000);
        let far = LinkSpec::profile("far").unwrap();
        assert_eq!(far.loss, 0.001);
        assert_eq!(far.one_way_delay_ns(), 25_000_000);
        assert_eq!(far.queue_limit(), 1_250_000);
        let dc = LinkSpec::profile("dc").unwrap();
        assert_eq!(dc.one_way_delay_ns(), 250_000);
        assert_eq!(dc.queue_limit(), 625_000);
        assert!(LinkSpec::profile("lan").unwrap().is_transparent());
        assert_eq!(LinkSpec::LAN.queue_limit(), u64::MAX);
        assert!(LinkSpec::profile("moon").is_none());
    }

    #[test]
    fn small_bdp_still_fits_two_super_packets() {
        let s = LinkSpec {
            rate_bps: Some(1_000_000),
            rtt_ns: 1_000_000,
            loss: 0.0,
            queue_bytes: None,
        };
        assert_eq!(s.queue_limit(), 2 * MAX_PACKET as u64);
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("500mbit").unwrap(), Some(500_000_000));
        assert_eq!(parse_rate("1Gbit").unwrap(), Some(1_000_000_000));
        assert_eq!(parse_rate("10gbit/s").unwrap(), Some(10_000_000_000));
        assert_eq!(parse_rate("2.5g").unwrap(), Some(2_500_000_000));
        assert_eq!(parse_rate("64kbit").unwrap(), Some(64_000));
        assert_eq!(parse_rate("1000").unwrap(), Some(1000));
        assert_eq!(parse_rate("0").unwrap(), None);
        assert_eq!(parse_rate("unlimited").unwrap(), None);
        assert!(parse_rate("5 furlongs").is_err());
        assert!(parse_rate("mbit").is_err());
        assert!(
            parse_rate("100mbps").is_err(),
            "bytes/s units are ambiguous: refused"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("10ms").unwrap(), 10_000_000);
        assert_eq!(parse_duration_ns("0.5ms").unwrap(), 500_000);
        assert_eq!(parse_duration_ns("250us").unwrap(), 250_000);
        assert_eq!(parse_duration_ns("1s").unwrap(), 1_000_000_000);
        assert_eq!(parse_duration_ns("0").unwrap(), 0);
        assert!(parse_duration_ns("10").is_err());
    }

    #[test]
    fn losses() {
        assert_eq!(parse_loss("0.01").unwrap(), 0.01);
        assert!((parse_loss("0.1%").unwrap() - 0.001).abs() < 1e-12);
        assert!(parse_loss("2").is_err());
        assert!(parse_loss("-0.1").is_err());
    }

    #[test]
    fn specs() {
        let s = LinkSpec::parse_spec("rate=500mbit,rtt=10ms,loss=0.01").unwrap();
        assert_eq!(
            s,
            LinkSpec {
                rate_bps: Some(500_000_000),
                rtt_ns: 10_000_000,
                loss: 0.01,
                queue_bytes: None
            }
        );
        assert_eq!(
            LinkSpec::parse_spec("far").unwrap(),
            LinkSpec::profile("far").unwrap()
        );
        let s = LinkSpec::parse_spec("profile=wan,loss=1%,queue=1m").unwrap();
        assert_eq!(s.rate_bps, Some(1_000_000_000));
        assert_eq!(s.queue_limit(), 1 << 20);
        assert!(LinkSpec::parse_spec("speed=1").is_err());
        assert!(LinkSpec::parse_spec("moon").is_err());
    }
}
