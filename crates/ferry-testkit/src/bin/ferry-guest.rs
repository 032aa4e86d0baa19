//! `ferry-guest`: talk to the ferry test guest from shell scripts (the demo).
//!
//! * `ferry-guest wait-ready LOG [--timeout S]`: waits for `FERRY-READY` in the console log
//!   and prints that line.
//! * `ferry-guest cmd SOCKET COMMAND... [--expect PREFIX] [--timeout S]`: sends a command on
//!   the console socket and prints the reply line. Exits non-zero on timeout, on a
//!   `FERRY-ERR` reply and, for `check`, on a `fail` result.

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
}

fn seconds(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| anyhow::anyhow!("--timeout {s} is not a valid number of seconds"))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
