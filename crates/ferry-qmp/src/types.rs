//! Typed QMP replies and arguments.
//!
//! All reply structs are tolerant: unknown fields are ignored, missing ones
//! default, and numeric fields that come back with an unexpected JSON type
//! decode as `None` instead of failing the whole reply. QEMU 10.0 changed
//! several reply shapes relative to 7.2 and the agent must handle both.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// A QEMU version, from the QMP greeting or `--version`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(default)]
pub struct QemuVersion {
    /// Major version (7, 10, ...).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro (patch) version.
    pub micro: u32,
}

impl QemuVersion {
    /// Builds a version from its three parts.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    /// True when this version is `major.minor` or newer.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl FromStr for QemuVersion {
    type Err = String;

    /// Parses `"10.0.2"` or `"7.2"` (micro defaults to 0). Trailing text after
    /// the numbers (`"10.0.2+ds"`) is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().splitn(3, '.');
        let num = |p: Option<&str>| -> Option<u32> {
            let p = p?;
            let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        };
        let major = num(parts.next()).ok_or_else(|| format!("bad QEMU version {s:?}"))?;
        let minor = num(parts.next()).ok_or_else(|| format!("bad QEMU version {s:?}"))?;
        let micro = num(parts.next()).unwrap_or(0);
        Ok(QemuVersion {
            major,
            minor,
            micro,
        })
    }
}

/// Reply of `query-status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunStatus {
    /// QEMU's run state: `"running"`, `"paused"`, `"prelaunch"`,
    /// `"inmigrate"`, `"postmigrate"`, `"finish-migrate"`, `"shutdown"`, ...
    pub status: String,
    /// Whether the vCPUs are running.
    pub running: bool,
}

/// Reply of `query-migrate`. Every field may be absent (e.g. before any
/// migration QEMU returns `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `"setup"`, `"active"`, `"pre-switchover"`, `"device"`, `"completed"`,
    /// `"failed"`, `"cancelling"`, `"cancelled"`, ...
    #[serde(deserialize_with = "lenient::string")]
    pub status: Option<String>,
    /// Milliseconds since the migration started (or total, once completed).
    #[serde(deserialize_with = "lenient::u64")]
    pub total_time: Option<u64>,
    /// Milliseconds the guest was stopped (once completed).
    #[serde(deserialize_with = "lenient::u64")]
    pub downtime: Option<u64>,
    /// Milliseconds spent in setup.
    #[serde(deserialize_with = "lenient::u64")]
    pub setup_time: Option<u64>,
    /// QEMU's estimate of the downtime in milliseconds (while active).
    #[serde(deserialize_with = "lenient::u64")]
    pub expected_downtime: Option<u64>,
    /// The failure reason, when `status` is `"failed"`.
    #[serde(deserialize_with = "lenient::string")]
    pub error_desc: Option<String>,
    /// RAM transfer statistics.
    #[serde(deserialize_with = "lenient::ram")]
    pub ram: Option<RamStats>,
}

/// The `ram` member of `query-migrate`.
///
/// Note: in 7.2 `transferred` counts uncompressed bytes for multifd; in 10.0
/// it counts real stream bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes transferred so far.
    #[serde(deserialize_with = "lenient::u64")]
    pub transferred: Option<u64>,
    /// Bytes still to send.
    #[serde(deserialize_with = "lenient::u64")]
    pub remaining: Option<u64>,
    /// Total guest RAM bytes.
    #[serde(deserialize_with = "lenient::u64")]
    pub total: Option<u64>,
    /// Pages found to be zero-filled (QEMU's "duplicate").
    #[serde(deserialize_with = "lenient::u64")]
    pub duplicate: Option<u64>,
    /// Pages sent in full.
    #[serde(deserialize_with = "lenient::u64")]
    pub normal: Option<u64>,
    /// Throughput in megabits per second.
    #[serde(deserialize_with = "lenient::f64")]
    pub mbps: Option<f64>,
    /// Dirty pages per second (QEMU's estimate).
    #[serde(deserialize_with = "lenient::u64")]
    pub dirty_pages_rate: Option<u64>,
    /// Number of dirty bitmap syncs (roughly: iterations).
    #[serde(deserialize_with = "lenient::u64")]
    pub dirty_sync_count: Option<u64>,
    /// Pages sent per second.
    #[serde(deserialize_with = "lenient::u64")]
    pub pages_per_second: Option<u64>,
}

/// Reply of `query-dirty-rate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// `"unstarted"`, `"measuring"` or `"measured"`.
    #[serde(deserialize_with = "lenient::string")]
    pub status: Option<String>,
    /// Estimated dirty rate in MiB/s (present once `"measured"`).
    #[serde(deserialize_with = "lenient::i64")]
    pub dirty_rate: Option<i64>,
    /// When the measurement started (QEMU's clock, seconds).
    #[serde(deserialize_with = "lenient::i64")]
    pub start_time: Option<i64>,
    /// The measuring period (seconds, or `calc-time-unit` in 10.0).
    #[serde(deserialize_with = "lenient::i64")]
    pub calc_time: Option<i64>,
    /// Pages sampled per GiB (page-sampling mode).
    #[serde(deserialize_with = "lenient::i64")]
    pub sample_pages: Option<i64>,
    /// `"page-sampling"`, `"dirty-bitmap"` or `"dirty-ring"`.
    #[serde(deserialize_with = "lenient::string")]
    pub mode: Option<String>,
}

/// Arguments of `announce-self` (QEMU >= 4.0): how many gratuitous
/// ARP/RARP rounds to send after a migration, and their spacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceParams {
    /// Initial delay in milliseconds.
    pub initial: u64,
    /// Maximum delay between rounds in milliseconds.
    pub max: u64,
    /// Number of rounds.
    pub rounds: u64,
    /// Delay increase per round in milliseconds.
    pub step: u64,
}

impl Default for AnnounceParams {
    /// QEMU's documented defaults (the `announce-*` migration parameters):
    /// initial 50, max 550, rounds 5, step 100.
    fn default() -> Self {
        AnnounceParams {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

/// Deserializers that map an unexpected JSON type to `None` instead of
/// failing the whole reply.
mod lenient {
    use super::*;

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }))
    }

    pub fn i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)))
    }

    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(v.as_f64())
    }

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(v.as_str().map(str::to_owned))
    }

    pub fn ram<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RamStats>, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(serde_json::from_value(v).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn version_parse_and_order() {
        assert_eq!(
            "10.0.2".parse::<QemuVersion>(),
            Ok(QemuVersion::new(10, 0, 2))
        );
        assert_eq!("7.2".parse::<QemuVersion>(), Ok(QemuVersion::new(7, 2, 0)));
        assert_eq!(
            "7.2.19+dfsg".parse::<QemuVersion>(),
            Ok(QemuVersion::new(7, 2, 19))
        );
        assert!("abc".parse::<QemuVersion>().is_err());
        assert!(QemuVersion::new(10, 0, 0) > QemuVersion::new(7, 2, 9));
        assert!(QemuVersion::new(7, 2, 0).at_least(4, 0));
        assert!(!QemuVersion::new(7, 2, 0).at_least(8, 0));
        assert_eq!(QemuVersion::new(10, 0, 2).to_string(), "10.0.2");
    }

    #[test]
    fn migration_info_7_2_shape() {
        // As 7.2 sends it: with `disk`, `compression`, `ram.skipped`.
        let v = json!({
            "status": "completed", "setup-time": 3, "downtime": 11, "total-time": 720,
            "disk": {"total": 0}, "compression": {"pages": 0},
            "ram": {"total": 537395200u64, "remaining": 0, "transferred": 150000000u64,
                    "duplicate": 90000, "normal": 36000, "skipped": 0, "mbps": 1650.5,
                    "dirty-pages-rate": 0, "dirty-sync-count": 3, "pages-per-second": 100000,
                    "normal-bytes": 147456000u64, "multifd-bytes": 0}
        });
        let m: MigrationInfo = serde_json::from_value(v).expect("decode");
        assert_eq!(m.status.as_deref(), Some("completed"));
        assert_eq!(m.downtime, Some(11));
        let ram = m.ram.expect("ram");
        assert_eq!(ram.transferred, Some(150_000_000));
        assert_eq!(ram.mbps, Some(1650.5));
        assert_eq!(ram.dirty_sync_count, Some(3));
    }

    #[test]
    fn migration_info_10_0_and_odd_shapes() {
        // 10.0: no disk/compression/skipped, new members; plus a field of a
        // changed type, which must not fail the reply.
        let v = json!({
            "status": "active", "expected-downtime": "soon", "brand-new": {"x": 1},
            "ram": {"transferred": 10, "mbps": 0, "postcopy-bytes": 0}
        });
        let m: MigrationInfo = serde_json::from_value(v).expect("decode");
        assert_eq!(m.status.as_deref(), Some("active"));
        assert_eq!(m.expected_downtime, None);
        assert_eq!(m.ram.as_ref().and_then(|r| r.mbps), Some(0.0));
        assert_eq!(m.ram.as_ref().and_then(|r| r.remaining), None);

        let empty: MigrationInfo = serde_json::from_value(json!({})).expect("decode");
        assert_eq!(empty, MigrationInfo::default());
    }

    #[test]
    fn run_status_with_and_without_singlestep() {
        let a: RunStatus =
            serde_json::from_value(json!({"status":"paused","singlestep":false,"running":false}))
                .expect("7.2");
        let b: RunStatus =
            serde_json::from_value(json!({"status":"running","running":true})).expect("10.0");
        assert_eq!(a.status, "paused");
        assert!(b.running);
    }
}
