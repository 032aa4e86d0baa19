//! Command-line syntax (clap derive). Everything that can be checked without an agent —
//! codec names, numeric ranges, certificate host specs — is checked while parsing.

use clap::{Args, Parser, Subcommand};
use ferry_wire::Codec;
use std::path::PathBuf;
use std::str::FromStr;

/// ferryctl: run VMs on ferry agents and live-migrate them between hosts.
#[derive(Debug, Parser)]
#[command(name = "ferryctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Options shared by every command.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalOpts {
    /// gRPC address (host:port) of the agent to talk to, or its name in the hosts file.
    #[arg(
        long,
        global = true,
        env = "FERRY_AGENT",
        default_value = "127.0.0.1:7701",
        value_name = "ADDR|NAME"
    )]
    pub agent: String,
    /// Hosts file naming the agents (TOML: `[hosts]` then `kvm1 = "10.0.0.1:7701"`), so
    /// --agent, --to and `ferryctl ui` can take names. Default:
    /// ~/.config/ferry/hosts.toml when it exists.
    #[arg(
        long = "hosts",
        id = "hosts_file",
        global = true,
        env = "FERRY_HOSTS",
        value_name = "FILE"
    )]
    pub hosts_file: Option<PathBuf>,
    /// Print the agent's responses as JSON instead of tables and reports
    /// (`migrate`/`watch`: one JSON object per line per progress update).
    #[arg(long, global = true)]
    pub json: bool,
    /// TLS identity (mutual TLS with the mesh CA).
    #[command(flatten)]
    pub tls: TlsOpts,
}

/// Where the client's TLS files are: `--ca/--cert/--key`, or `--pki-dir DIR --identity NAME`
/// for `DIR/ca.pem`, `DIR/NAME.pem`, `DIR/NAME.key`. Explicit files override the
/// directory's.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "TLS (mutual, with the mesh CA)")]
pub struct TlsOpts {
    /// Mesh CA certificate (PEM).
    #[arg(long, global = true, env = "FERRY_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) issued by the mesh CA.
    #[arg(long, global = true, env = "FERRY_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, global = true, env = "FERRY_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Directory made by `ferryctl certs init` (use with --identity).
    #[arg(long, global = true, env = "FERRY_PKI_DIR", value_name = "DIR")]
    pub pki_dir: Option<PathBuf>,
    /// Host name whose certificate to use from --pki-dir.
    #[arg(long, global = true, env = "FERRY_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Define, start, stop, inspect VMs on the agent.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a VM from the agent (--agent) to another agent.
    Migrate(MigrateArgs),
    /// Check whether a VM can move to a target, and predict how the migration will go.
    Preflight(PreflightArgs),
    /// List, inspect, watch and cancel migrations.
    #[command(subcommand)]
    Migrations(MigrationsCommand),
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Benchmark codecs on your own hosts and link: migrate a VM to another agent and
    /// back once per codec (and per --repeat), each move verified; print the table and
    /// write JSON and an SVG plot.
    Bench(BenchArgs),
    /// Serve the web console on a loopback address: hosts, VMs, migrations live, history.
    /// It calls the agents over gRPC with this command's certificate; the page gets a
    /// session token (printed at start), never a credential.
    Ui(UiArgs),
}

/// `ferryctl vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM from a TOML spec file.
    Define {
        /// Spec file (the fields of ferry_qemu::VmSpec).
        spec: PathBuf,
    },
    /// Start a defined VM.
    Start {
        /// VM name.
        name: String,
    },
    /// Stop a running VM (ACPI power-down unless --force).
    Stop {
        /// VM name.
        name: String,
        /// Kill QEMU instead of asking the guest to power down.
        #[arg(long)]
        force: bool,
    },
    /// Pause a running guest's vCPUs (QEMU keeps running; like `virsh suspend`).
    Suspend {
        /// VM name.
        name: String,
    },
    /// Resume a paused guest (like `virsh resume`).
    Resume {
        /// VM name.
        name: String,
    },
    /// Let a fenced copy run again (`vm show` says why it is fenced): only once you have
    /// settled which copy lives, e.g. stopped the one on the other host.
    ClearFence {
        /// VM name.
        name: String,
    },
    /// Remove a stopped VM's definition.
    Undefine {
        /// VM name.
        name: String,
    },
    /// Show every field of a VM (spec, state, pid, sockets, RAM file).
    Show {
        /// VM name.
        name: String,
    },
    /// List the agent's VMs.
    List,
}

/// `ferryctl migrate VM --to ADDR ...`
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Name of the VM to move (it runs on --agent).
    pub vm: String,
    /// gRPC address (host:port) of the target agent.
    #[arg(long, value_name = "TARGET_ADDR")]
    pub to: String,
    /// Page compression: auto (the default: picked per migration from the link, the
    /// free CPU and the guest's pages, revisited every round), none, lz4, zstd or
    /// zstd:LEVEL (1 to 19, or zstd's fast levels -1 to -5). Disk blocks use zstd-1
    /// under auto.
    #[arg(long, value_name = "CODEC", value_parser = parse_compression)]
    pub compress: Option<Compression>,
    /// Downtime target in milliseconds (agent default: 30).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..))]
    pub downtime: Option<u32>,
    /// Most pre-copy rounds before the switchover (agent default: 30).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: Option<u32>,
    /// Parallel QUIC page streams, 1-16 (agent default: one per core, at most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub streams: Option<u32>,
    /// Skip the RAM digest comparison at switchover (same as `--verify none`).
    #[arg(long, conflicts_with = "verify")]
    pub no_verify: bool,
    /// RAM verification before the commit: `sent` (default: sums of the pages sent,
    /// compared with the target's, plus an audit of the write tracker during pre-copy),
    /// `full` (the source also hashes all of its RAM in the pause: the pause grows with
    /// the RAM size) or `none`.
    #[arg(long, value_name = "MODE", value_parser = ["sent", "full", "none"])]
    pub verify: Option<String>,
    /// Print the migration id and exit instead of watching.
    #[arg(long)]
    pub detach: bool,
    /// Leave the guest paused on the target after the switchover (like `virsh migrate
    /// --suspend`); `ferryctl vm resume` runs it.
    #[arg(long)]
    pub suspend: bool,
    /// Disks: `auto` (detect shared storage with a token file beside each image; copy the
    /// rest), `shared` (refuse unless the target sees the same images) or `copy` (always
    /// mirror the disks to the target; refused if it sees the same files).
    #[arg(long, value_name = "MODE", value_parser = ["auto", "shared", "copy"])]
    pub storage: Option<String>,
    /// Cold migration (like `virsh migrate --offline --persistent` with the disks copied):
    /// move a stopped VM's disk images and definition. Interrupted copies resume.
    #[arg(long)]
    pub offline: bool,
    /// With --offline: start the VM on the target once it is there.
    #[arg(long, requires = "offline")]
    pub start: bool,
    /// With --offline: remove the VM's definition from the source afterwards (its image
    /// files stay there).
    #[arg(long, requires = "offline")]
    pub undefine_source: bool,
    /// With --offline: stop a running VM first (ACPI power-down, then quit) instead of
    /// refusing.
    #[arg(long, requires = "offline")]
    pub stop_source: bool,
    /// Go ahead although soft preflight checks failed (e.g. predicted non-convergence).
    #[arg(long)]
    pub force: bool,
    /// Cap the data plane: bytes per second with an optional K/M/G suffix (powers of
    /// 1024), or bits with `bit`: `200M`, `1G`, `500mbit`.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
    /// Roll back if the migration is not ready to commit in time, e.g. `90s`, `5m`.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
    /// When pre-copy rounds stop shrinking: pause (stop-and-copy), abort, or throttle
    /// (lower the guest's CPU quota step by step).
    #[arg(long, value_name = "POLICY", value_parser = ["pause", "abort", "throttle"])]
    pub on_stall: Option<String>,
}

/// `ferryctl bench VM --to HOST`
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The VM to move (running on --agent; it ends there again).
    pub vm: String,
    /// The other agent: host:port or a name from the hosts file.
    #[arg(long, value_name = "ADDR|NAME")]
    pub to: String,
    /// Codecs to compare, comma-separated.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "none,lz4,zstd:1,zstd:3,auto",
        value_parser = parse_compression
    )]
    pub codecs: Vec<Compression>,
    /// Round trips (there and back) per codec.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub repeat: u32,
    /// Directory for `bench-<vm>.json` and `bench-<vm>.svg`.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
    /// Seconds to let the guest run between moves (its writes settle back to normal).
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    pub settle: f64,
    /// Downtime target in milliseconds (agent default: 30).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..))]
    pub downtime: Option<u32>,
    /// Cap the data plane (same syntax as `migrate --bandwidth`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
    /// RAM verification of every move: `sent` (default) or `full`.
    #[arg(long, value_name = "MODE", default_value = "sent", value_parser = ["sent", "full"])]
    pub verify: String,
    /// Give up on a move that has not ended after this long.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// `ferryctl ui`
#[derive(Debug, Clone, Args)]
pub struct UiArgs {
    /// Loopback address to serve on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7780", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// An agent to show, NAME=HOST:PORT (repeatable). Default: every host in the hosts
    /// file, else the one --agent names.
    #[arg(long = "host", value_name = "NAME=ADDR", value_parser = parse_named_host)]
    pub agents: Vec<(String, String)>,
}

/// `NAME=HOST:PORT`.
pub fn parse_named_host(s: &str) -> Result<(String, String), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=HOST:PORT"))?;
    crate::hosts::check_name(name).map_err(|e| e.to_string())?;
    if addr
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(format!("{s:?}: {addr:?} is not HOST:PORT"));
    }
    Ok((name.to_string(), addr.to_string()))
}

/// `ferryctl preflight VM --to ADDR`: the checks and prediction, without migrating.
#[derive(Debug, Clone, Args)]
pub struct PreflightArgs {
    /// VM to check.
    pub vm: String,
    /// Target agent's gRPC address (host:port).
    #[arg(long, value_name = "TARGET_ADDR")]
    pub to: String,
    /// Codec to predict with (auto is sampled as zstd-1).
    #[arg(long, value_name = "CODEC", value_parser = parse_compression)]
    pub compress: Option<Compression>,
    /// Downtime target in milliseconds.
    #[arg(long, value_name = "MS")]
    pub downtime: Option<u32>,
    /// Bandwidth cap to predict with (same syntax as `migrate --bandwidth`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bandwidth: Option<u64>,
}

/// Parses a rate: `123` (bytes/s), `200K`/`200M`/`2G` (binary multiples of bytes/s),
/// `500kbit`/`500mbit`/`1gbit` (decimal bits/s).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult): (&str, f64) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1e9 / 8.0)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1e6 / 8.0)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1e3 / 8.0)
    } else if let Some(n) = t.strip_suffix('g') {
        (n, 1073741824.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 1048576.0)
    } else if let Some(n) = t.strip_suffix('k') {
        (n, 1024.0)
    } else {
        (t.as_str(), 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad rate '{s}': use e.g. 200M, 1G or 500mbit"))?;
    let bytes = (v * mult) as u64;
    if bytes == 0 {
        return Err(format!("rate '{s}' is zero"));
    }
    Ok(bytes)
}

/// `ferryctl migrations ...`
#[derive(Debug, Subcommand)]
pub enum MigrationsCommand {
    /// List the migrations the agent knows.
    List,
    /// Show a migration's status and statistics.
    Show {
        /// Migration id.
        id: String,
    },
    /// Follow a migration's progress until it finishes (exit code as for `migrate`).
    Watch {
        /// Migration id.
        id: String,
    },
    /// Cancel a migration (rolled back: the VM keeps running on the source).
    Cancel {
        /// Migration id.
        id: String,
    },
    /// Settle a migration IN_DOUBT (the source cannot learn whether the target took the
    /// VM) by the operator's word. Ask the source agent. The source asks the target once
    /// more; only if it still gives no answer does the VM come back to the source (live:
    /// the guest resumes there; cold: the VM is free there). A target that answers is
    /// believed instead, and one that is reachable makes the agent refuse.
    Resolve {
        /// Migration id.
        id: String,
        /// The target host is gone for good: destroyed, or it will never run this VM
        /// again (its disks wiped, its agent's state removed). If it comes back with its
        /// state it is told: a copy it has not run yet is discarded (cold: a definition
        /// it has not started is removed), but one that ran there meanwhile stays, and the
        /// VM is then on two hosts: only say this when you know.
        #[arg(long, required = true)]
        target_gone: bool,
    },
}

/// `ferryctl certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create (or extend) a PKI: a CA, an agent certificate per host, and operator and
    /// reader certificates. Each certificate names its role and holder in a SAN URI
    /// (urn:ferry:agent:NAME, urn:ferry:operator:NAME, urn:ferry:reader:NAME): agents
    /// serve the peer API only to agents and the control API only to operators (readers:
    /// list, get and watch).
    Init {
        /// Output directory (an existing CA there is reused).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// An agent host: NAME or NAME:SAN,SAN,... (DNS names or IPs it is reached at;
        /// localhost and 127.0.0.1 are always included). Repeat for more hosts.
        #[arg(long = "host", value_name = "NAME[:SAN,...]", value_parser = parse_host_spec)]
        hosts: Vec<HostSpec>,
        /// An operator (a person or orchestrator: the whole control API). Repeatable.
        #[arg(long = "operator", value_name = "NAME", value_parser = parse_name)]
        operators: Vec<String>,
        /// A read-only client (monitoring). Repeatable.
        #[arg(long = "reader", value_name = "NAME", value_parser = parse_name)]
        readers: Vec<String>,
        /// Validity of the new certificates, days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Show a certificate's role, name, serial (what `[tls] deny_serials` takes) and expiry.
    Show {
        /// PEM certificate file.
        cert: PathBuf,
    },
}

/// A certificate holder's name (operator, reader).
pub fn parse_name(s: &str) -> Result<String, String> {
    if ferry_transport::identity::valid_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?}: a name is 1-64 of [A-Za-z0-9._-]"))
    }
}

/// A host of `certs init`: its name and extra subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Host name (certificate CN, file name stem).
    pub name: String,
    /// Extra DNS names or IP addresses.
    pub sans: Vec<String>,
}

/// Parses `NAME[:SAN,SAN...]`. The name is everything before the first `:`, so IPv6 SANs
/// work (`kvm1:::1,fe80::2`).
pub fn parse_host_spec(s: &str) -> Result<HostSpec, String> {
    let (name, sans) = match s.split_once(':') {
        Some((name, sans)) => (name, sans),
        None => (s, ""),
    };
    let name = name.trim();
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with(['.', '-']);
    if !ok {
        return Err(format!(
            "host name {name:?} must be letters, digits, '.', '_' or '-' (it becomes a file name)"
        ));
    }
    let sans: Vec<String> = sans
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    Ok(HostSpec {
        name: name.to_string(),
        sans,
    })
}

/// Parses a codec name with [`Codec::from_str`] so a bad one fails before any network call.
pub fn parse_codec(s: &str) -> Result<Codec, String> {
    Codec::from_str(s).map_err(|e| e.to_string())
}

/// `--compress`: `auto` or a codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// The agent picks (and revisits) the codec.
    Auto,
    /// Always this codec.
    Codec(Codec),
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Auto => f.write_str("auto"),
            Compression::Codec(c) => write!(f, "{c}"),
        }
    }
}

/// Parses `auto` or a codec name (see [`parse_codec`]).
pub fn parse_compression(s: &str) -> Result<Compression, String> {
    if s.eq_ignore_ascii_case("auto") {
        Ok(Compression::Auto)
    } else {
        parse_codec(s).map(Compression::Codec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ferryctl").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn hosts_file_and_host_flags_do_not_collide() {
        // The global --hosts FILE beside subcommands' own --host flags.
        let c = parse(&[
            "--hosts", "h.toml", "certs", "init", "--dir", "d", "--host", "kvm1",
        ])
        .expect("certs init");
        assert_eq!(c.global.hosts_file, Some(PathBuf::from("h.toml")));
        let c = parse(&["ui", "--host", "a=127.0.0.1:7701", "--hosts", "h.toml"]).expect("ui");
        match c.command {
            Command::Ui(u) => assert_eq!(u.agents, vec![("a".into(), "127.0.0.1:7701".into())]),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["ui", "--host", "a=nowhere"]).is_err());
        assert!(parse(&["--hosts", "h.toml", "vm", "list"]).is_ok());
    }

    #[test]
    fn vm_commands() {
        let c = parse(&["vm", "define", "web1.toml"]).expect("parse");
        assert!(
            matches!(c.command, Command::Vm(VmCommand::Define { ref spec }) if spec == &PathBuf::from("web1.toml"))
        );
        let c = parse(&["vm", "stop", "web1", "--force"]).expect("parse");
        assert!(
            matches!(c.command, Command::Vm(VmCommand::Stop { ref name, force: true }) if name == "web1")
        );
        let c = parse(&["vm", "stop", "web1"]).expect("parse");
        assert!(matches!(
            c.command,
            Command::Vm(VmCommand::Stop { force: false, .. })
        ));
        for (args, ok) in [
            (&["vm", "start", "a"][..], true),
            (&["vm", "undefine", "a"], true),
            (&["vm", "show", "a"], true),
            (&["vm", "list"], true),
            (&["vm", "start"], false),
            (&["vm", "reboot", "a"], false),
        ] {
            assert_eq!(parse(args).is_ok(), ok, "{args:?}");
        }
    }

    #[test]
    fn global_options_go_anywhere() {
        let c = parse(&[
            "--agent",
            "10.0.0.1:7701",
            "vm",
            "list",
            "--json",
            "--pki-dir",
            "/p",
            "--identity",
            "ops",
        ])
        .expect("parse");
        assert_eq!(c.global.agent, "10.0.0.1:7701");
        assert!(c.global.json);
        assert_eq!(c.global.tls.pki_dir, Some(PathBuf::from("/p")));
        assert_eq!(c.global.tls.identity.as_deref(), Some("ops"));
        let c = parse(&[
            "vm", "list", "--ca", "/c", "--cert", "/x.pem", "--key", "/x.key",
        ])
        .expect("parse");
        assert_eq!(c.global.tls.ca, Some(PathBuf::from("/c")));
        assert_eq!(c.global.tls.key, Some(PathBuf::from("/x.key")));
    }

    #[test]
    fn migrate_options() {
        let c = parse(&[
            "migrate",
            "web1",
            "--to",
            "kvm02:7701",
            "--compress",
            "zstd:3",
            "--downtime",
            "50",
            "--max-rounds",
            "10",
            "--streams",
            "8",
            "--no-verify",
        ])
        .expect("parse");
        let Command::Migrate(m) = c.command else {
            panic!("not migrate")
        };
        assert_eq!(m.vm, "web1");
        assert_eq!(m.to, "kvm02:7701");
        assert_eq!(
            m.compress,
            Some(Compression::Codec(Codec::Zstd { level: 3 }))
        );
        assert_eq!(
            (m.downtime, m.max_rounds, m.streams),
            (Some(50), Some(10), Some(8))
        );
        assert!(m.no_verify && !m.detach);

        let c = parse(&["migrate", "web1", "--to", "b:1", "--detach"]).expect("parse");
        let Command::Migrate(m) = c.command else {
            panic!("not migrate")
        };
        assert_eq!((m.compress, m.downtime, m.streams), (None, None, None));
        assert!(m.detach && !m.no_verify);
        let c = parse(&["migrate", "web1", "--to", "b:1", "--verify", "full"]).expect("parse");
        let Command::Migrate(m) = c.command else {
            panic!("not migrate")
        };
        assert_eq!(m.verify.as_deref(), Some("full"));
        assert!(parse(&["migrate", "v", "--to", "b:1", "--verify", "some"]).is_err());
        assert!(parse(&[
            "migrate",
            "v",
            "--to",
            "b:1",
            "--verify",
            "full",
            "--no-verify"
        ])
        .is_err());
        for codec in ["auto", "none", "lz4", "zstd", "ZSTD:19"] {
            parse(&["migrate", "v", "--to", "b:1", "--compress", codec]).expect(codec);
        }
    }

    #[test]
    fn offline_migrate_options() {
        let c = parse(&[
            "migrate",
            "web1",
            "--to",
            "b:1",
            "--offline",
            "--start",
            "--undefine-source",
            "--stop-source",
        ])
        .expect("parse");
        let Command::Migrate(m) = c.command else {
            panic!("not migrate")
        };
        assert!(m.offline && m.start && m.undefine_source && m.stop_source);
        let c = parse(&["migrate", "web1", "--to", "b:1"]).expect("parse");
        let Command::Migrate(m) = c.command else {
            panic!("not migrate")
        };
        assert!(!m.offline && !m.start && !m.undefine_source && !m.stop_source);
        for flag in ["--start", "--undefine-source", "--stop-source"] {
            let e = parse(&["migrate", "v", "--to", "b:1", flag]).expect_err(flag);
            assert!(e.to_string().contains("--offline"), "{flag}: {e}");
        }
    }

    #[test]
    fn migrate_rejects_bad_values_before_any_network_call() {
        for (args, needle) in [
            (
                &["migrate", "v", "--to", "b:1", "--compress", "gzip"][..],
                "unknown codec",
            ),
            (
                &["migrate", "v", "--to", "b:1", "--compress", "zstd:25"],
                "out of range",
            ),
            (
                &["migrate", "v", "--to", "b:1", "--compress", "zstd:x"],
                "unknown codec",
            ),
            (
                &["migrate", "v", "--to", "b:1", "--streams", "0"],
                "--streams",
            ),
            (
                &["migrate", "v", "--to", "b:1", "--streams", "17"],
                "--streams",
            ),
            (
                &["migrate", "v", "--to", "b:1", "--downtime", "0"],
                "--downtime",
            ),
            (
                &["migrate", "v", "--to", "b:1", "--max-rounds", "x"],
                "--max-rounds",
            ),
        ] {
            let e = parse(args).expect_err("must be rejected");
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{args:?}: {e}");
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
        let e = parse(&["migrate", "v"]).expect_err("--to is required");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn migrations_commands() {
        let c = parse(&["migrations", "watch", "m-1"]).expect("parse");
        assert!(
            matches!(c.command, Command::Migrations(MigrationsCommand::Watch { ref id }) if id == "m-1")
        );
        let c = parse(&["migrations", "cancel", "m-1"]).expect("parse");
        assert!(matches!(
            c.command,
            Command::Migrations(MigrationsCommand::Cancel { .. })
        ));
        parse(&["migrations", "list"]).expect("parse");
        parse(&["migrations", "show", "m-1"]).expect("parse");
        assert!(parse(&["migrations", "show"]).is_err());
    }

    #[test]
    fn certs_init_hosts() {
        let c = parse(&[
            "certs",
            "init",
            "--dir",
            "/tmp/pki",
            "--host",
            "a",
            "--host",
            "b:b.example,10.0.0.2",
        ])
        .expect("parse");
        let Command::Certs(CertsCommand::Init { dir, hosts, .. }) = c.command else {
            panic!("not certs init")
        };
        assert_eq!(dir, PathBuf::from("/tmp/pki"));
        assert_eq!(
            hosts[0],
            HostSpec {
                name: "a".into(),
                sans: vec![]
            }
        );
        assert_eq!(
            hosts[1],
            HostSpec {
                name: "b".into(),
                sans: vec!["b.example".into(), "10.0.0.2".into()]
            }
        );
        let c = parse(&[
            "certs",
            "init",
            "--dir",
            "/p",
            "--operator",
            "ops",
            "--reader",
            "grafana",
        ])
        .expect("operators and readers only");
        let Command::Certs(CertsCommand::Init {
            operators, readers, ..
        }) = c.command
        else {
            panic!("not certs init")
        };
        assert_eq!(
            (operators, readers),
            (vec!["ops".to_string()], vec!["grafana".to_string()])
        );
        assert!(parse(&["certs", "init", "--dir", "/p", "--operator", "a:b"]).is_err());
        assert!(parse(&["certs", "init", "--dir", "/p", "--host", "../x"]).is_err());
        assert!(parse(&["certs", "init", "--dir", "/p", "--host", ":san"]).is_err());
    }

    #[test]
    fn host_specs() {
        assert_eq!(
            parse_host_spec("kvm1:::1,fe80::2").expect("ipv6"),
            HostSpec {
                name: "kvm1".into(),
                sans: vec!["::1".into(), "fe80::2".into()]
            }
        );
        assert_eq!(
            parse_host_spec("a:").expect("empty sans").sans,
            Vec::<String>::new()
        );
        assert!(parse_host_spec("a/b").is_err());
    }
}
