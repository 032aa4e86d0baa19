//! Running a parsed command against an agent.

use crate::cli::{
    CertsCommand, Cli, Command, GlobalOpts, MigrateArgs, MigrationsCommand, PreflightArgs, UiArgs,
    VmCommand,
};
use crate::connect::{connect_with, load_identity, resolve_tls_files, rpc_error};
use crate::hosts::Hosts;
use crate::{json, report, spec};
use anyhow::{Context, Result};
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_control_client::FerryControlClient;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Exit code when the user stopped watching with Ctrl-C (the migration goes on).
pub const EXIT_INTERRUPTED: u8 = 130;

type Client = FerryControlClient<Channel>;

/// Runs a command; the result is the process exit code (see [`report::exit_code`] for
/// migrations). Errors are returned for the caller to print.
pub async fn run(cli: Cli) -> Result<u8> {
    let mut g = cli.global;
    if !matches!(cli.command, Command::Certs(_) | Command::Ui(_)) {
        g.agent = resolve_host(&g, &g.agent)?;
    }
    match cli.command {
        Command::Ui(a) => ui(&g, a).await,
        Command::Bench(a) => {
            let to = resolve_host(&g, &a.to)?;
            let ca = connect_with(&g.agent, &g.tls).await?;
            let cb = connect_with(&to, &g.tls).await?;
            crate::bench::run(ca, cb, &g.agent, &to, &a).await
        }
        Command::Certs(CertsCommand::Init {
            dir,
            hosts,
            operators,
            readers,
            days,
        }) => {
            use ferry_transport::Role;
            if hosts.is_empty() && operators.is_empty() && readers.is_empty() {
                anyhow::bail!("nothing to issue: give --host, --operator or --reader");
            }
            let had_ca = dir.join("ca.pem").exists() && dir.join("ca.key").exists();
            let agents: Vec<(String, Vec<String>)> = hosts
                .iter()
                .map(|h| (h.name.clone(), h.sans.clone()))
                .collect();
            let plain = |names: &[String]| -> Vec<(String, Vec<String>)> {
                names.iter().map(|n| (n.clone(), Vec::new())).collect()
            };
            for (role, list) in [
                (Role::Agent, agents),
                (Role::Operator, plain(&operators)),
                (Role::Reader, plain(&readers)),
            ] {
                ferry_transport::pki::write_dev_certs(&dir, role, &list, days).map_err(|e| {
                    anyhow::anyhow!("writing {role} certificates in {}: {e}", dir.display())
                })?;
                for (name, _) in &list {
                    let f = ferry_transport::pki::host_files(&dir, name);
                    println!("{} ({role} {name})", f.cert.display());
                    println!("{}", f.key.display());
                }
            }
            let ca = if had_ca {
                "(existing CA reused)"
            } else {
                "(new CA)"
            };
            println!("{} {ca}", dir.join("ca.pem").display());
            println!("{}", dir.join("ca.key").display());
            Ok(0)
        }
        Command::Certs(CertsCommand::Show { cert }) => {
            let pem = std::fs::read(&cert)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", cert.display()))?;
            let der = rustls_pemfile::certs(&mut pem.as_slice())
                .next()
                .ok_or_else(|| anyhow::anyhow!("no certificate in {}", cert.display()))?
                .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
            let id = ferry_transport::PeerIdentity::from_der(der.as_ref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
            let expires = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(id.not_after_unix.max(0) as u64),
            );
            println!("role:    {}", id.role);
            println!("name:    {}", id.name);
            println!("serial:  {}", id.serial);
            println!("expires: {expires}");
            Ok(0)
        }
        Command::Vm(cmd) => {
            // Read and check a spec before connecting: a bad file needs no agent.
            let define_spec = match &cmd {
                VmCommand::Define { spec } => Some(spec::load_spec(spec)?),
                _ => None,
            };
            let mut client = connect_with(&g.agent, &g.tls).await?;
            vm(&mut client, &g, cmd, define_spec).await
        }
        Command::Migrate(mut args) => {
            args.to = resolve_host(&g, &args.to)?;
            let mut client = connect_with(&g.agent, &g.tls).await?;
            migrate(&mut client, &g, args).await
        }
        Command::Preflight(mut args) => {
            args.to = resolve_host(&g, &args.to)?;
            let mut client = connect_with(&g.agent, &g.tls).await?;
            preflight(&mut client, &g, args).await
        }
        Command::Migrations(cmd) => {
            let mut client = connect_with(&g.agent, &g.tls).await?;
            migrations(&mut client, &g, cmd).await
        }
    }
}

/// An agent's address from a name in the hosts file, or the address given.
fn resolve_host(g: &GlobalOpts, name_or_addr: &str) -> Result<String> {
    if g.hosts_file.is_none() && name_or_addr.contains(':') {
        return Ok(name_or_addr.to_string());
    }
    Hosts::from_option(g.hosts_file.as_deref())?.resolve(name_or_addr)
}

/// `ferryctl ui`: binds the loopback listener, prints the address with the session
/// token, serves until interrupted.
async fn ui(g: &GlobalOpts, a: UiArgs) -> Result<u8> {
    if !a.listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {}: the console serves on a loopback address only (127.0.0.1 or [::1]); \
             reach it from elsewhere through an SSH tunnel",
            a.listen
        );
    }
    let hosts: std::collections::BTreeMap<String, String> = if !a.agents.is_empty() {
        a.agents.into_iter().collect()
    } else {
        let file = Hosts::from_option(g.hosts_file.as_deref())?;
        if file.hosts.is_empty() {
            let addr = resolve_host(g, &g.agent)?;
            [(crate::connect::host_of(&addr).to_string(), addr)].into()
        } else {
            file.hosts
        }
    };
    let identity = load_identity(&resolve_tls_files(&g.tls)?)?;
    let token = crate::ui::new_token();
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr().context("listener address")?;
    // Written, not println!: a reader that went away (a closed pipe) must not stop the
    // console.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ferry console: http://{addr}/?token={token}");
        for (name, agent) in &hosts {
            let _ = writeln!(out, "  agent {name} at {agent}");
        }
        let _ = writeln!(
            out,
            "(the token is this session's key: anyone with it can drive these agents as you)"
        );
        let _ = out.flush();
    }
    let console = std::sync::Arc::new(crate::ui::Console::new(hosts, identity, token, addr.port()));
    tokio::select! {
        r = crate::ui::serve(listener, console) => r.map(|_| 0),
        _ = tokio::signal::ctrl_c() => Ok(0),
    }
}

async fn preflight(client: &mut Client, g: &GlobalOpts, a: PreflightArgs) -> Result<u8> {
    let req = pb::PreflightRequest {
        vm: a.vm.clone(),
        target: a.to.clone(),
        compress: a.compress.map(|c| c.to_string()).unwrap_or_default(),
        downtime_ms: a.downtime.unwrap_or(0),
        bandwidth_bytes_per_sec: a.bandwidth.unwrap_or(0),
    };
    let r = client
        .preflight(req)
        .await
        .map_err(|s| rpc_error(&format!("preflight of VM {} to {}", a.vm, a.to), s))?
        .into_inner();
    if g.json {
        print_json(&json::preflight_report(&r));
    } else {
        print!("{}", report::preflight_report(&r));
    }
    Ok(if r.ok {
        0
    } else if r.ok_with_force {
        5
    } else {
        1
    })
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

async fn vm(
    client: &mut Client,
    g: &GlobalOpts,
    cmd: VmCommand,
    define_spec: Option<pb::VmSpec>,
) -> Result<u8> {
    let name_ref = |name: &str| pb::VmRef {
        name: name.to_string(),
    };
    let (info, verb) = match cmd {
        VmCommand::List => {
            let vms = client
                .list_vms(pb::ListVmsRequest {})
                .await
                .map_err(|s| rpc_error("list VMs", s))?
                .into_inner()
                .vms;
            if g.json {
                print_json(&json::vm_list(&vms));
            } else if vms.is_empty() {
                println!("no VMs defined on {}", g.agent);
            } else {
                print!("{}", report::vm_table(&vms));
            }
            return Ok(0);
        }
        VmCommand::Define { spec } => {
            let pb_spec = define_spec.context("internal: spec not loaded")?;
            let name = pb_spec.name.clone();
            let info = client
                .define_vm(pb::DefineVmRequest {
                    spec: Some(pb_spec),
                })
                .await
                .map_err(|s| rpc_error(&format!("define VM {name} from {}", spec.display()), s))?;
            (info, "defined")
        }
        VmCommand::Start { name } => (
            client
                .start_vm(name_ref(&name))
                .await
                .map_err(|s| rpc_error(&format!("start VM {name}"), s))?,
            "started",
        ),
        VmCommand::Stop { name, force } => (
            client
                .stop_vm(pb::StopVmRequest {
                    name: name.clone(),
                    force,
                })
                .await
                .map_err(|s| rpc_error(&format!("stop VM {name}"), s))?,
            if force { "killed" } else { "stopped" },
        ),
        VmCommand::Suspend { name } => (
            client
                .suspend_vm(name_ref(&name))
                .await
                .map_err(|s| rpc_error(&format!("suspend VM {name}"), s))?,
            "suspended",
        ),
        VmCommand::Resume { name } => (
            client
                .resume_vm(name_ref(&name))
                .await
                .map_err(|s| rpc_error(&format!("resume VM {name}"), s))?,
            "resumed",
        ),
        VmCommand::ClearFence { name } => (
            client
                .clear_fence(name_ref(&name))
                .await
                .map_err(|s| rpc_error(&format!("clear the fence of VM {name}"), s))?,
            "unfenced",
        ),
        VmCommand::Undefine { name } => (
            client
                .undefine_vm(name_ref(&name))
                .await
                .map_err(|s| rpc_error(&format!("undefine VM {name}"), s))?,
            "undefined",
        ),
        VmCommand::Show { name } => (
            client
                .get_vm(name_ref(&name))
                .await
                .map_err(|s| rpc_error(&format!("show VM {name}"), s))?,
            "",
        ),
    };
    let info = info.into_inner();
    if g.json {
        print_json(&json::vm_info(&info));
    } else if verb.is_empty() {
        print!("{}", report::vm_details(&info));
    } else {
        let name = info.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("?");
        let pid = if info.pid != 0 {
            format!(", pid {}", info.pid)
        } else {
            String::new()
        };
        println!(
            "VM {name} {verb} ({}{pid})",
            report::vm_state_name(info.state())
        );
    }
    Ok(0)
}

async fn migrate(client: &mut Client, g: &GlobalOpts, a: MigrateArgs) -> Result<u8> {
    let req = pb::StartMigrationRequest {
        vm: a.vm.clone(),
        target: a.to.clone(),
        compress: a.compress.map(|c| c.to_string()).unwrap_or_default(),
        downtime_ms: a.downtime.unwrap_or(0),
        max_rounds: a.max_rounds.unwrap_or(0),
        page_streams: a.streams.unwrap_or(0),
        skip_verify: a.no_verify,
        verify: a.verify.clone().unwrap_or_default(),
        force: a.force,
        bandwidth_bytes_per_sec: a.bandwidth.unwrap_or(0),
        timeout_s: a
            .timeout
            .map(|d| d.as_secs().clamp(1, u64::from(u32::MAX)) as u32)
            .unwrap_or(0),
        on_stall: a.on_stall.clone().unwrap_or_default(),
        leave_paused: a.suspend,
        storage: a.storage.clone().unwrap_or_default(),
        offline: a.offline,
        start_on_target: a.start,
        undefine_source: a.undefine_source,
        stop_source: a.stop_source,
    };
    let status = client
        .start_migration(req)
        .await
        .map_err(|s| rpc_error(&format!("start migration of VM {} to {}", a.vm, a.to), s))?
        .into_inner();
    if a.detach {
        if g.json {
            print_json(&json::migration_status(&status));
        } else {
            println!("{}", status.id);
        }
        return Ok(0);
    }
    if !g.json {
        eprintln!(
            "migration {} started: VM {} {} -> {}",
            status.id,
            status.vm,
            if status.source.is_empty() {
                &g.agent
            } else {
                &status.source
            },
            if status.target.is_empty() {
                &a.to
            } else {
                &status.target
            }
        );
    }
    watch(client, g, &status.id).await
}

async fn migrations(client: &mut Client, g: &GlobalOpts, cmd: MigrationsCommand) -> Result<u8> {
    let mref = |id: &str| pb::MigrationRef { id: id.to_string() };
    match cmd {
        MigrationsCommand::List => {
            let ms = client
                .list_migrations(pb::ListMigrationsRequest {})
                .await
                .map_err(|s| rpc_error("list migrations", s))?
                .into_inner()
                .migrations;
            if g.json {
                print_json(&json::migration_list(&ms));
            } else if ms.is_empty() {
                println!("no migrations on {}", g.agent);
            } else {
                print!("{}", report::migration_table(&ms));
            }
            Ok(0)
        }
        MigrationsCommand::Show { id } => {
            let m = client
                .get_migration(mref(&id))
                .await
                .map_err(|s| rpc_error(&format!("show migration {id}"), s))?;
            let m = m.into_inner();
            if g.json {
                print_json(&json::migration_status(&m));
            } else {
                print!("{}", report::final_report(&m));
            }
            Ok(0)
        }
        MigrationsCommand::Watch { id } => watch(client, g, &id).await,
        MigrationsCommand::Cancel { id } => {
            let m = client
                .cancel_migration(mref(&id))
                .await
                .map_err(|s| rpc_error(&format!("cancel migration {id}"), s))?
                .into_inner();
            if g.json {
                print_json(&json::migration_status(&m));
            } else {
                let phase = report::phase_name(m.phase());
                if report::is_terminal(m.phase()) {
                    println!("migration {id}: {phase}");
                } else {
                    println!(
                        "migration {id}: cancel requested (now {phase}); follow the rollback with \
                         `ferryctl migrations watch {id}`"
                    );
                }
            }
            Ok(0)
        }
        MigrationsCommand::Resolve { id, target_gone } => {
            let m = client
                .resolve_migration(pb::ResolveMigrationRequest {
                    id: id.clone(),
                    target_gone,
                })
                .await
                .map_err(|s| rpc_error(&format!("resolve migration {id}"), s))?
                .into_inner();
            if g.json {
                print_json(&json::migration_status(&m));
            } else if report::is_terminal(m.phase()) {
                print!("{}", report::final_report(&m));
            } else {
                let phase = report::phase_name(m.phase());
                println!(
                    "migration {id}: verdict taken (now {phase}); follow it with \
                     `ferryctl migrations watch {id}`"
                );
            }
            Ok(0)
        }
    }
}

/// indicatif template of the live display: phase, round and elapsed time with the bar;
/// the transfer line; the convergence line (custom key `dirty`).
const PROGRESS_TEMPLATE: &str =
    "{spinner:.green} {prefix:.bold} [{bar:30.cyan/blue}] {percent:>3}%\n  {wide_msg}\n  {dirty}";

/// How often a progress line is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// The live display: a progress bar plus a log line above it for every phase change and
/// agent event. When stderr is not a terminal the bar is hidden and a one-line summary is
/// logged every few seconds instead.
struct Display {
    bar: ProgressBar,
    dirty_line: Arc<Mutex<String>>,
    last_phase: Option<pb::MigrationPhase>,
    last_message: String,
    last_logged: Option<Instant>,
}

impl Display {
    fn new() -> Display {
        let bar = ProgressBar::new(0);
        let dirty_line = Arc::new(Mutex::new(String::new()));
        let shown = dirty_line.clone();
        let style = ProgressStyle::with_template(PROGRESS_TEMPLATE)
            .map(|s| {
                s.progress_chars("=> ").with_key(
                    "dirty",
                    move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                        if let Ok(line) = shown.lock() {
                            let _ = w.write_str(&line);
                        }
                    },
                )
            })
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(120));
        Display {
            bar,
            dirty_line,
            last_phase: None,
            last_message: String::new(),
            last_logged: None,
        }
    }

    fn update(&mut self, s: &pb::MigrationStatus) {
        let phase = s.phase();
        if self.last_phase != Some(phase) {
            let elapsed = report::millis(s.stats.as_ref().map(|st| st.elapsed_ms).unwrap_or(0));
            let line = format!("[{elapsed:>8}] phase {}", report::phase_name(phase));
            // `suspend` rather than `println`: it also prints when the bar is hidden.
            self.bar.suspend(|| eprintln!("{line}"));
            self.last_phase = Some(phase);
        }
        if !s.message.is_empty() && s.message != self.last_message {
            self.bar.suspend(|| eprintln!("           {}", s.message));
            self.last_message = s.message.clone();
        }
        if self.bar.is_hidden() {
            if self.last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY)
                && !report::is_terminal(phase)
            {
                eprintln!("           {}", report::progress_line(s));
                self.last_logged = Some(Instant::now());
            }
            return;
        }
        if let Ok(mut line) = self.dirty_line.lock() {
            *line = report::progress_dirty(s);
        }
        let (pos, len) = report::progress_position(s);
        self.bar.set_length(len);
        self.bar.set_position(pos);
        self.bar.set_prefix(report::progress_prefix(s));
        self.bar.set_message(report::progress_transfer(s));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Follows a migration until it reaches a final phase; prints the final report and returns
/// the exit code for that phase. Ctrl-C stops watching (the migration goes on) and says how
/// to cancel it.
pub async fn watch(client: &mut Client, g: &GlobalOpts, id: &str) -> Result<u8> {
    let mref = pb::MigrationRef { id: id.to_string() };
    let mut stream = client
        .watch_migration(mref.clone())
        .await
        .map_err(|s| rpc_error(&format!("watch migration {id}"), s))?
        .into_inner();
    let mut display = (!g.json).then(Display::new);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut last: Option<pb::MigrationStatus> = None;
    let end = loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                if let Some(d) = &display { d.finish(); }
                eprintln!("\nstopped watching; migration {id} continues on the agent.");
                eprintln!("  watch again:  ferryctl migrations watch {id}");
                eprintln!("  cancel it:    ferryctl migrations cancel {id}");
                return Ok(EXIT_INTERRUPTED);
            }
            msg = stream.message() => match msg {
                Ok(Some(s)) => {
                    if g.json {
                        println!("{}", json::migration_status(&s));
                    } else if let Some(d) = display.as_mut() {
                        d.update(&s);
                    }
                    let done = report::is_terminal(s.phase());
                    last = Some(s);
                    if done { break Ok(()); }
                }
                Ok(None) => break Ok(()),
                Err(status) => break Err(status),
            }
        }
    };
    if let Some(d) = &display {
        d.finish();
    }
    let final_status = match (last, end) {
        (Some(s), _) if report::is_terminal(s.phase()) => s,
        (_, end) => {
            // The stream ended early: ask once for the current state.
            let lost = match end {
                Err(status) => rpc_error("watch stream", status).to_string(),
                Ok(()) => "the agent closed the watch stream".to_string(),
            };
            let s = client
                .get_migration(mref)
                .await
                .map_err(|s| rpc_error(&format!("{lost}; then get migration {id}"), s))?
                .into_inner();
            if !report::is_terminal(s.phase()) {
                anyhow::bail!(
                    "{lost} before migration {id} finished (now {}); watch again with `ferryctl migrations watch {id}`",
                    report::phase_name(s.phase())
                );
            }
            if g.json {
                println!("{}", json::migration_status(&s));
            }
            s
        }
    };
    if !g.json {
        let text = report::final_report(&final_status);
        if final_status.phase() == pb::MigrationPhase::Completed {
            print!("{text}");
        } else {
            // The error goes to stderr too, so it is seen even when stdout is captured.
            eprint!("{text}");
        }
    }
    Ok(report::exit_code(final_status.phase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_template_is_valid() {
        ProgressStyle::with_template(PROGRESS_TEMPLATE).expect("valid template");
    }
}
