//! `ferry-guest`: talk to the ferry test guest from shell scripts (the demo).
//!
//! * `ferry-guest wait-ready LOG [--timeout S]`: waits for `FERRY-READY` in the console log
//!   and prints that line.
//! * `ferry-guest cmd SOCKET COMMAND... [--expect PREFIX] [--timeout S]`: sends a command on
//!   the console socket and prints the reply line. Exits non-zero on timeout, on a
//!   `FERRY-ERR` reply and, for `check`, on a `fail` result.
//! * `ferry-guest qemu-argv SPEC.toml --ram FILE --run-dir DIR [--accel A] [--incoming]`:
//!   prints, as a JSON array, the QEMU argv ferryd would use for that VM spec, so the
//!   benchmark harness runs QEMU's own migration on exactly the same guest.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use ferry_testkit::console::{parse_check, reply_prefix_for, wait_for_log_line, GuestConsole};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Talk to the ferry test guest's console.
#[derive(Debug, Parser)]
#[command(name = "ferry-guest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// `Cmd::Cmd` is the `cmd` subcommand scripts call: its name stays.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Wait for FERRY-READY in a console log file and print the line.
    WaitReady {
        /// Console log (VmInfo.console_log).
        log: PathBuf,
        /// Seconds to wait.
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
    },
    /// Send a command (check, digest, rate R, pause, resume, ping) and print the reply.
    Cmd {
        /// Console socket (VmInfo.console_socket).
        socket: PathBuf,
        /// The command and its arguments (`rate 5`).
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
        /// Reply prefix to wait for (default: the known reply of the command).
        #[arg(long)]
        expect: Option<String>,
        /// Seconds to wait for the connection and for the reply.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
    /// Print ferryd's QEMU argv for a VM spec (TOML) as a JSON array.
    QemuArgv {
        /// VM spec file (the fields of ferry_qemu::VmSpec).
        spec: PathBuf,
        /// Guest RAM file.
        #[arg(long)]
        ram: PathBuf,
        /// Directory for QEMU's sockets, pidfile and logs.
        #[arg(long)]
        run_dir: PathBuf,
        /// Accelerator (tcg or kvm).
        #[arg(long, default_value = "tcg")]
        accel: String,
        /// Start as a migration target (`-S -incoming defer`).
        #[arg(long)]
        incoming: bool,
    },
}

fn seconds(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow::anyhow!("--timeout {s} is not a valid number of seconds"))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::QemuArgv {
            spec,
            ram,
            run_dir,
            accel,
            incoming,
        } => {
            let text = std::fs::read_to_string(&spec)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", spec.display()))?;
            let spec: ferry_qemu::VmSpec = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("VM spec {}: {e}", spec.display()))?;
            let mut launch = ferry_qemu::QemuLaunch::new(spec, accel, ram, run_dir);
            launch.incoming = incoming;
            launch.validate()?;
            println!("{}", serde_json::to_string(&launch.argv())?);
        }
        Cmd::WaitReady { log, timeout } => {
            println!(
                "{}",
                wait_for_log_line(&log, "FERRY-READY", seconds(timeout)?).await?
            );
        }
        Cmd::Cmd {
            socket,
            command,
            expect,
            timeout,
        } => {
            let timeout = seconds(timeout)?;
            let command = command.join(" ");
            let prefix = match expect.as_deref().or_else(|| reply_prefix_for(&command)) {
                Some(p) => p.to_string(),
                None => bail!("no known reply for {command:?}: give --expect PREFIX"),
            };
            let mut console = GuestConsole::connect(&socket, timeout).await?;
            let reply = console.command(&command, &prefix, timeout).await?;
            println!("{reply}");
            if reply.starts_with("FERRY-CHECK") && !parse_check(&reply)?.ok {
                bail!("guest memory check failed: {reply}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry-guest: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-guest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
