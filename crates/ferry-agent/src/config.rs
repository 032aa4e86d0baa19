//! ferryd's TOML configuration.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The agent's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of this host in the mesh (shown in errors and reports).
    pub host_name: String,
    /// gRPC listen address (control API for clients, peer API for agents).
    pub grpc_listen: SocketAddr,
    /// QUIC data-plane listen address.
    pub quic_listen: SocketAddr,
    /// Where guest RAM files live (a tmpfs: /dev/shm/ferry by default).
    #[serde(default = "default_ram_dir")]
    pub ram_dir: PathBuf,
    /// Journal, per-VM run directories, the uffd shim.
    pub state_dir: PathBuf,
    /// QEMU accelerator for VMs whose spec names none: "kvm" in production, "tcg" where
    /// /dev/kvm cannot run guests (tests, nested hosts).
    #[serde(default = "default_accel")]
    pub accel: String,
    #[serde(default = "default_qemu")]
    pub qemu_binary: PathBuf,
    /// QEMU trace event patterns enabled in every QEMU this agent starts, logged to
    /// `qemu-trace.log` in the VM's run directory (e.g. `["vmstate_downtime*"]`: where
    /// a migration's pause goes inside QEMU). None by default.
    #[serde(default)]
    pub qemu_trace: Vec<String>,
    pub tls: TlsConfig,
    /// Prometheus metrics endpoint (plain HTTP, `GET /metrics`); none when unset.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Directories this agent may read and write disk images in. A VM spec or a peer
    /// request naming an image outside them (after resolving `..` and symlinks) is refused.
    #[serde(default)]
    pub storage_roots: Vec<PathBuf>,
    /// Directories direct-boot kernels, initrds and firmware may be read from. A VM spec
    /// (defined here or arriving with a migration) naming a file outside them is refused:
    /// QEMU would read it with the agent's privileges and hand it to the guest.
    #[serde(default = "default_boot_roots")]
    pub boot_roots: Vec<PathBuf>,
    /// The file this configuration was read from (re-read on SIGHUP).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    #[serde(default)]
    pub migration: MigrationDefaults,
    #[serde(default)]
    pub preflight: PreflightConfig,
}

/// What this host reports about itself in preflight, where it should not be read from
/// the machine. Meant for tests and for hosts whose /proc/cpuinfo does not tell the
/// truth about what guests get.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreflightConfig {
    /// CPU features offered to guests (cpuinfo names), instead of the detected ones.
    pub cpu_features: Option<Vec<String>>,
    /// CPU vendor string, instead of /proc/cpuinfo's.
    pub cpu_vendor: Option<String>,
}

/// Mesh certificates (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Serial numbers (hex, as `openssl x509 -serial` or `ferryctl certs show` print them)
    /// of mesh certificates refused on every API and on the data plane. Re-read on SIGHUP.
    #[serde(default)]
    pub deny_serials: Vec<String>,
}

/// Defaults for migrations that do not say otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationDefaults {
    /// QUIC streams the pages travel on, each compressed by its own thread; 0 (the
    /// default): one per core, at most 4 ([`auto_page_streams`]).
    pub page_streams: u32,
    pub downtime_ms: u32,
    pub max_rounds: u32,
    /// Seconds a prepared incoming migration waits for its source before removing itself.
    pub prepare_timeout_s: u64,
    /// Seconds of silence after which a QUIC peer is declared gone.
    pub idle_timeout_s: u64,
    /// Benchmark instrumentation: after a committed outgoing migration keep the guest RAM
    /// file as it was at switchover (`<vm>.after-migration` in ram_dir) so a harness can
    /// compare it page by page with the target's. Off in production: it costs a RAM copy.
    pub retain_source_ram: bool,
    /// Pace page streams at 0.88x the link rate the preflight probe measured instead of
    /// leaving it to QUIC congestion control alone. Off by default: on the testbed's `wan`
    /// link it cut queue drops from ~40% to ~10% of what was sent, but the probe's
    /// estimate varies by +-15% run to run, so a fixed pace also cost 10-20% of goodput.
    pub pace_to_link: bool,
    /// From pre-copy round 2 on, fit QUIC's send window to the congestion window alone
    /// (no margin ahead of it): what a round writes is then in flight, and nothing queues
    /// ahead of the final round. `"lossless"` (the default): on a path where round 0 lost
    /// no more than [`TightTailWindow::LOSSLESS_MAX`] of its packets; `true`: always;
    /// `false`: never. Measured: on the testbed's `wan` link (no loss) it paused 24-34 ms
    /// against 28-70 without it and ran 10% faster on a day where queue-draining waits
    /// decided most pauses (equal on a day before); on `far` (0.1% loss) it cut the pause
    /// by a third (54-94 ms against 78-176) for 3-16% more total time, the later rounds
    /// being ack-clocked by a congestion window the losses keep small.
    pub tight_tail_window: TightTailWindow,
    /// QUIC congestion controller of the data plane: "bbr", "cubic" or "cubic-filtered"
    /// (cubic that ignores losses no queue explains: ferry_transport::congestion).
    pub congestion: String,
    /// The data plane's receiver acknowledges every this many packets (QUIC ACK
    /// frequency extension; 2 is RFC 9000's rule): fewer ACK datagrams to send and to
    /// process on both hosts.
    pub ack_every: u32,
    /// Careful resume: a data-plane connection to a peer this agent sent a migration to
    /// in the last 10 minutes starts with half the window that path carried (when its
    /// handshake RTT matches), not with slow start (ferry_transport::resume).
    pub careful_resume: bool,
    /// Deadline of every peer gRPC call (Prepare, Abort, IncomingStatus, ...), seconds.
    pub peer_call_timeout_s: u64,
    /// Deadline of each pre-copy round's confirmation by the target, seconds.
    pub round_timeout_s: u64,
    /// Deadline of the switchover with the guest paused (last pages, device state, the
    /// source QEMU's fence), seconds: past it the migration rolls back.
    pub switchover_timeout_s: u64,
    /// How long the source waits for the target's answer to Commit before asking over
    /// gRPC (IN_DOUBT while it cannot), seconds.
    pub commit_timeout_s: u64,
    /// How long a restarted target holding a committed, never-resumed VM keeps it paused
    /// waiting for its source's word (the source may have taken it back on an operator's
    /// verdict), seconds; then it resumes it. A source that is still settling asks within
    /// seconds.
    pub committed_await_source_s: u64,
    /// Deadline for every disk mirror to become READY, seconds.
    pub mirror_ready_timeout_s: u64,
    /// Settled migration records the journal keeps (history); older ones are pruned.
    pub journal_history: usize,
    /// A cold copy that moves no image byte for this long fails (the target is connected
    /// but takes nothing: hung storage, say), seconds.
    pub cold_stall_timeout_s: u64,
    /// How often disk copies that a migration which did not commit left behind (their
    /// removal failed) are tried again, seconds (also at start-up). 0: at start-up only.
    pub left_behind_retry_s: u64,
    /// What a failed cold copy left for a resume is removed after this long, seconds
    /// (checked every quarter of it, at most hourly): a partial image untouched that long,
    /// an image it received whole and never defined a VM on once that long has passed
    /// since it arrived or the copy was given up — unless a VM or an incoming migration
    /// uses it. 0: kept until an attempt resumes or adopts it, or the operator's cancel
    /// reaches this host (and nothing is journaled for it).
    pub partial_keep_s: u64,
    /// Live migrations this host runs as the source at once; more are refused.
    pub max_outgoing: usize,
    /// Live migrations this host receives at once; more Prepares are refused.
    pub max_incoming: usize,
    /// Memory (MiB) an incoming migration must leave available for the host and its
    /// other guests: a Prepare needing more is refused (admission).
    pub memory_reserve_mib: u64,
    /// Pages of guest RAM the source re-hashes each pre-copy round to audit its write
    /// tracker against what it sent (`--verify sent`); windows rotate over the RAM.
    /// 0 turns the audit off (the start-up self-test remains).
    pub audit_pages_per_round: u64,
}

/// Page streams when neither the request nor the config names a number: one per core, at
/// most 4. Each stream compresses on its own thread, so streams beyond the cores only add
/// threads that take turns on them: on 2 cores 4 streams cost 5% more agent CPU than 2 for
/// the same time on wan and far (benches/RESULTS.md, tenth session). Pure.
pub fn auto_page_streams(cores: usize) -> u32 {
    cores.clamp(1, 4) as u32
}

impl MigrationDefaults {
    /// The page streams a migration that does not say uses ([`auto_page_streams`] for 0).
    pub fn page_streams(&self) -> u32 {
        if self.page_streams == 0 {
            auto_page_streams(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
            )
        } else {
            self.page_streams
        }
    }
}

impl Default for MigrationDefaults {
    fn default() -> Self {
        MigrationDefaults {
            page_streams: 0,
            downtime_ms: 30,
            max_rounds: 30,
            prepare_timeout_s: 60,
            idle_timeout_s: 10,
            retain_source_ram: false,
            pace_to_link: false,
            tight_tail_window: TightTailWindow::Lossless,
            // Measured (benches/RESULTS.md): BBR's time on wan and far with a third of its
            // bytes on far, where plain cubic collapses.
            congestion: "cubic-filtered".into(),
            ack_every: 2,
            careful_resume: true,
            peer_call_timeout_s: 60,
            round_timeout_s: 120,
            switchover_timeout_s: 60,
            commit_timeout_s: 30,
            committed_await_source_s: 300,
            mirror_ready_timeout_s: 3600,
            journal_history: 500,
            left_behind_retry_s: 60,
            // A day: a failed copy retried the same day resumes; a week of them does not
            // fill the host.
            partial_keep_s: 86_400,
            cold_stall_timeout_s: 120,
            // KubeVirt's defaults: two per node each way.
            max_outgoing: 2,
            max_incoming: 2,
            memory_reserve_mib: 512,
            // 128 MiB: ~25 ms of one core per round, the whole of a 1 GiB guest in 8 rounds.
            audit_pages_per_round: 32 * 1024,
        }
    }
}

fn default_ram_dir() -> PathBuf {
    PathBuf::from("/dev/shm/ferry")
}
fn default_boot_roots() -> Vec<PathBuf> {
    vec![PathBuf::from("/var/lib/ferry/boot")]
}
fn default_accel() -> String {
    "kvm".into()
}
fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

impl AgentConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let mut cfg: AgentConfig =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        cfg.source = Some(path.to_path_buf());
        cfg.check()
            .with_context(|| format!("checking config {}", path.display()))?;
        Ok(cfg)
    }

    /// Consistency checks that serde cannot express.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.host_name.is_empty(), "host_name is empty");
        anyhow::ensure!(
            matches!(self.accel.as_str(), "kvm" | "tcg"),
            "accel must be kvm or tcg, not '{}'",
            self.accel
        );
        if let Some(bad) = self
            .qemu_trace
            .iter()
            .find(|p| !ferry_qemu::valid_trace_pattern(p))
        {
            anyhow::bail!(
                "qemu_trace: {bad:?} is not a trace event pattern (letters, digits, _ - *)"
            );
        }
        let m = &self.migration;
        anyhow::ensure!(
            m.page_streams <= 16,
            "migration.page_streams must be 0 (one per core) to 16"
        );
        anyhow::ensure!(m.max_rounds >= 1, "migration.max_rounds must be at least 1");
        anyhow::ensure!(
            m.max_outgoing >= 1 && m.max_incoming >= 1,
            "migration.max_outgoing and max_incoming must be at least 1"
        );
        Ok(())
    }

    /// The journal database file.
    pub fn journal_path(&self) -> PathBuf {
        self.state_dir.join("ferry.redb")
    }

    /// Per-VM run directory (QMP socket, console, pidfile, logs).
    pub fn run_dir(&self, vm: &str) -> PathBuf {
        self.state_dir.join("run").join(vm)
    }

    /// Guest RAM file of a VM on this host.
    pub fn ram_path(&self, vm: &str) -> PathBuf {
        self.ram_dir.join(format!("{vm}.ram"))
    }
}

/// When pre-copy's later rounds send with no margin ahead of the congestion window
/// (`[migration] tight_tail_window`: `true`, `false` or `"lossless"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "TightTailSetting")]
pub enum TightTailWindow {
    /// From round 2 on, whatever the path.
    Always,
    /// Never: every round keeps the usual margin.
    Never,
    /// From round 2 on, where round 0 lost at most [`Self::LOSSLESS_MAX`] of its packets.
    Lossless,
}

/// What the TOML may hold for [`TightTailWindow`]: a flag or a word.
#[derive(Deserialize)]
#[serde(untagged)]
enum TightTailSetting {
    Flag(bool),
    Word(String),
}

impl TryFrom<TightTailSetting> for TightTailWindow {
    type Error = String;
    fn try_from(v: TightTailSetting) -> Result<Self, String> {
        match v {
            TightTailSetting::Flag(true) => Ok(Self::Always),
            TightTailSetting::Flag(false) => Ok(Self::Never),
            TightTailSetting::Word(w) if w == "lossless" => Ok(Self::Lossless),
            TightTailSetting::Word(w) => Err(format!(
                "tight_tail_window: '{w}' is neither true, false nor \"lossless\""
            )),
        }
    }
}

impl TightTailWindow {
    /// Share of round 0's packets lost above which `Lossless` keeps the margin: the
    /// testbed's lossless links measured 0, its 0.1%-loss link 0.09-0.11%.
    pub const LOSSLESS_MAX: f64 = 1e-4;

    /// Whether pre-copy round `round` sends with no margin, given round 0's measured loss
    /// share (`None` before it is known). Pure.
    pub fn applies(self, round: u32, round0_loss: Option<f64>) -> bool {
        round >= 2
            && match self {
                Self::Always => true,
                Self::Never => false,
                Self::Lossless => round0_loss.is_some_and(|l| l <= Self::LOSSLESS_MAX),
            }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_streams_default_to_one_per_core_up_to_four() {
        use super::auto_page_streams as auto;
        assert_eq!(auto(0), 1);
        assert_eq!(auto(1), 1);
        assert_eq!(auto(2), 2);
        assert_eq!(auto(4), 4);
        assert_eq!(auto(64), 4);
        let named = super::MigrationDefaults {
            page_streams: 3,
            ..Default::default()
        };
        assert_eq!(named.page_streams(), 3);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            super::MigrationDefaults::default().page_streams(),
            auto(cores)
        );
    }

    #[test]
    fn the_tight_tail_window_follows_the_setting_and_round_0s_losses() {
        use super::TightTailWindow as T;
        let parse = |v: &str| -> Result<T, String> {
            #[derive(serde::Deserialize)]
            struct W {
                w: T,
            }
            toml::from_str::<W>(&format!("w = {v}"))
                .map(|w| w.w)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("true"), Ok(T::Always));
        assert_eq!(parse("false"), Ok(T::Never));
        assert_eq!(parse("\"lossless\""), Ok(T::Lossless));
        assert!(parse("\"sometimes\"").unwrap_err().contains("lossless"));
        assert_eq!(
            super::MigrationDefaults::default().tight_tail_window,
            T::Lossless
        );
        // Never before round 2; lossless paths only, as measured by round 0.
        assert!(!T::Always.applies(1, Some(0.0)));
        assert!(T::Always.applies(2, Some(0.01)));
        assert!(!T::Never.applies(5, Some(0.0)));
        assert!(T::Lossless.applies(2, Some(0.0)));
        assert!(!T::Lossless.applies(2, Some(0.001)));
        assert!(!T::Lossless.applies(2, None));
    }

    use super::*;

    #[test]
    fn sample_config_parses_and_checks() {
        let cfg: AgentConfig = toml::from_str(include_str!("../../../dist/ferryd.toml"))
            .expect("dist/ferryd.toml parses");
        cfg.check().expect("dist/ferryd.toml is consistent");
        assert_eq!(cfg.host_name, "kvm01");
        assert_eq!(cfg.migration.downtime_ms, 30);
        assert!(cfg.metrics_listen.is_some());
    }

    #[test]
    fn unknown_keys_and_bad_accel_are_refused() {
        let base = "host_name='a'\ngrpc_listen='127.0.0.1:1'\nquic_listen='127.0.0.1:2'\nstate_dir='/tmp/x'\n[tls]\nca='c'\ncert='c'\nkey='k'\n";
        assert!(toml::from_str::<AgentConfig>(&format!("bogus = 1\n{base}")).is_err());
        let cfg: AgentConfig = toml::from_str(&format!("accel = 'xen'\n{base}")).expect("parses");
        assert!(cfg.check().unwrap_err().to_string().contains("accel"));
        let cfg: AgentConfig = toml::from_str(&format!(
            "qemu_trace = ['vmstate_downtime*', 'x,file=/etc/y']\n{base}"
        ))
        .expect("parses");
        assert!(cfg.check().unwrap_err().to_string().contains("qemu_trace"));
    }
}
