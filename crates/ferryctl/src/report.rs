//! Human-readable output: sizes, durations, rates, tables, the migration progress line and
//! the final migration report. Pure functions of the gRPC messages, so they can be tested
//! without an agent.

use ferry_api::v1::{MigrationPhase, MigrationStats, MigrationStatus, VmInfo, VmState};
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

/// Guest page size the statistics count in.
pub const PAGE_SIZE: u64 = 4096;

/// A byte count in binary units: `512 B`, `1.5 KiB`, `547.8 MiB`, `2.00 GiB`.
///
/// One decimal below GiB, two from GiB up (a 2 GiB guest shows as `2.00 GiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit >= 2 {
        format!("{v:.2} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A transfer rate in bytes per second: `130.2 MiB/s`; `-` when unknown (zero, negative or
/// not finite).
pub fn rate(bytes_per_sec: f64) -> String {
    if !bytes_per_sec.is_finite() || bytes_per_sec <= 0.0 {
        return "-".into();
    }
    format!("{}/s", bytes(bytes_per_sec.round() as u64))
}

/// A duration given in milliseconds: `0 ms`, `11 ms`, `4.21 s`, `2m 03s`, `1h 02m 03s`.
pub fn millis(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms} ms");
    }
    if ms < 60_000 {
        return format!("{:.2} s", ms as f64 / 1000.0);
    }
    let secs = ms / 1000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

/// A [`Duration`] formatted like [`millis`].
pub fn duration(d: Duration) -> String {
    millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A compression ratio: `1.82x`; `-` when not measured (zero or not finite).
pub fn ratio(r: f64) -> String {
    if !r.is_finite() || r <= 0.0 {
        return "-".into();
    }
    format!("{r:.2}x")
}

/// A count with thousands separators: `140,233`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    // Groups of three from the right; the digits are ASCII, so every chunk is UTF-8.
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).unwrap_or("?"))
        .collect();
    groups.join(",")
}

/// A dirty rate given in pages per second: `2,100 pages/s (8.2 MiB/s)`; `-` when zero.
pub fn dirty_rate(pages_per_sec: f64) -> String {
    if !pages_per_sec.is_finite() || pages_per_sec <= 0.0 {
        return "-".into();
    }
    format!(
        "{} pages/s ({})",
        count(pages_per_sec.round() as u64),
        rate(pages_per_sec * PAGE_SIZE as f64)
    )
}

/// A Unix time in milliseconds as RFC 3339 UTC (`2025-01-31T12:00:00Z`); `-` when zero.
pub fn unix_ms(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) if ms > 0 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        _ => "-".into(),
    }
}

/// `-` for an empty string.
fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The short name of a VM state: `RUNNING`, `DEFINED`, ….
pub fn vm_state_name(state: VmState) -> &'static str {
    let full = state.as_str_name();
    full.strip_prefix("VM_STATE_").unwrap_or(full)
}

/// The short name of a migration phase: `PRECOPY`, `COMPLETED`, ….
pub fn phase_name(phase: MigrationPhase) -> &'static str {
    let full = phase.as_str_name();
    full.strip_prefix("MIGRATION_PHASE_").unwrap_or(full)
}

/// Whether a migration in this phase has finished (successfully or not).
pub fn is_terminal(phase: MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::Completed
            | MigrationPhase::Failed
            | MigrationPhase::Cancelled
            | MigrationPhase::InDoubt
    )
}

/// Process exit code for a finished migration: 0 completed, 1 failed, 3 cancelled, 4 in
/// doubt (2 is left to usage errors). A phase that is not terminal gives 1.
pub fn exit_code(phase: MigrationPhase) -> u8 {
    match phase {
        MigrationPhase::Completed => 0,
        MigrationPhase::Cancelled => 3,
        MigrationPhase::InDoubt => 4,
        _ => 1,
    }
}

/// Renders rows as a left-aligned table with a header, columns two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let w = widths.get(i).copied().unwrap_or(0);
            let _ = write!(l, "{cell:<w$}");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `vm list`: name, state, vCPUs, memory, pid.
pub fn vm_table(vms: &[VmInfo]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            let spec = vm.spec.clone().unwrap_or_default();
            vec![
                spec.name,
                // A fenced copy must catch the eye in the list: `vm show` says why.
                if vm.fenced.is_empty() {
                    vm_state_name(vm.state()).to_string()
                } else {
                    format!("{} (fenced)", vm_state_name(vm.state()))
                },
                spec.vcpus.to_string(),
                bytes(spec.memory_mib.saturating_mul(1024 * 1024)),
                if vm.pid == 0 {
                    "-".into()
                } else {
                    vm.pid.to_string()
                },
            ]
        })
        .collect();
    table(&["NAME", "STATE", "VCPUS", "MEMORY", "PID"], &rows)
}

/// `vm show`: every field of a VM, spec included.
pub fn vm_details(vm: &VmInfo) -> String {
    let spec = vm.spec.clone().unwrap_or_default();
    let mut o = String::new();
    let mut kv = |k: &str, v: &str| {
        let _ = writeln!(o, "{k:<16}{v}");
    };
    kv("name", or_dash(&spec.name));
    kv("state", vm_state_name(vm.state()));
    if !vm.fenced.is_empty() {
        kv("fence", &vm.fenced);
    }
    kv("vcpus", &spec.vcpus.to_string());
    kv(
        "memory",
        &format!(
            "{} MiB{}",
            spec.memory_mib,
            if spec.memory_prealloc {
                " (preallocated)"
            } else {
                ""
            }
        ),
    );
    kv(
        "cpu model",
        if spec.cpu_model.is_empty() {
            "(default)"
        } else {
            &spec.cpu_model
        },
    );
    kv(
        "machine",
        if spec.machine.is_empty() {
            "(default)"
        } else {
            &spec.machine
        },
    );
    kv(
        "accel",
        if spec.accel.is_empty() {
            "(agent default)"
        } else {
            &spec.accel
        },
    );
    kv("kernel", or_dash(&spec.kernel));
    kv("initrd", or_dash(&spec.initrd));
    kv("cmdline", or_dash(&spec.cmdline));
    if spec.disks.is_empty() {
        kv("disks", "-");
    }
    for d in &spec.disks {
        let fmt = if d.format.is_empty() {
            "qcow2"
        } else {
            &d.format
        };
        let ro = if d.read_only { ", read-only" } else { "" };
        kv(
            &format!("disk {}", d.id),
            &format!("{} ({fmt}{ro})", d.path),
        );
    }
    if spec.nics.is_empty() {
        kv("nics", "-");
    }
    for n in &spec.nics {
        let backend = if n.bridge.is_empty() {
            "user networking".to_string()
        } else {
            format!("bridge {}", n.bridge)
        };
        let mac = if n.mac.is_empty() { "auto MAC" } else { &n.mac };
        kv(&format!("nic {}", n.id), &format!("{backend}, {mac}"));
    }
    kv(
        "pid",
        &if vm.pid == 0 {
            "-".to_string()
        } else {
            vm.pid.to_string()
        },
    );
    kv("qmp socket", or_dash(&vm.qmp_socket));
    kv("console socket", or_dash(&vm.console_socket));
    kv("console log", or_dash(&vm.console_log));
    kv("ram file", or_dash(&vm.ram_file));
    o
}

/// `migrations list`: id, VM, source, target, phase, elapsed time, downtime, start time.
pub fn migration_table(migrations: &[MigrationStatus]) -> String {
    let rows: Vec<Vec<String>> = migrations
        .iter()
        .map(|m| {
            let st = m.stats.clone().unwrap_or_default();
            vec![
                m.id.clone(),
                m.vm.clone(),
                or_dash(&m.source).to_string(),
                or_dash(&m.target).to_string(),
                phase_name(m.phase()).to_string(),
                millis(st.elapsed_ms),
                if st.downtime_ms == 0 {
                    "-".into()
                } else {
                    millis(st.downtime_ms)
                },
                unix_ms(m.started_unix_ms),
            ]
        })
        .collect();
    table(
        &[
            "ID", "VM", "SOURCE", "TARGET", "PHASE", "ELAPSED", "DOWNTIME", "STARTED",
        ],
        &rows,
    )
}

/// Progress bar length and position for a migration. While a pre-copy round runs, the
/// round's own pages (in bytes): done of what it has to send, refreshed every 250 ms by the
/// agent. Otherwise guest RAM bytes, and how much of the first full pass is done (the
/// pages sent with data plus zero pages; the bar is full from the second round on and
/// once the guest is paused). `(0, 0)` while the RAM size is not known yet.
pub fn progress_position(status: &MigrationStatus) -> (u64, u64) {
    let st = status.stats.clone().unwrap_or_default();
    if is_offline(&st) {
        // A cold migration: the bar follows the disk images.
        return (
            st.disk_bytes_done.min(st.disk_bytes_total),
            st.disk_bytes_total,
        );
    }
    if st.round_pages > 0 && status.phase() == MigrationPhase::Precopy {
        return (
            st.round_pages_done
                .min(st.round_pages)
                .saturating_mul(PAGE_SIZE),
            st.round_pages.saturating_mul(PAGE_SIZE),
        );
    }
    if st.guest_ram_bytes == 0 {
        return (0, 0);
    }
    let first_pass_done = st.rounds >= 2
        || matches!(
            status.phase(),
            MigrationPhase::Switchover
                | MigrationPhase::Verifying
                | MigrationPhase::Committing
                | MigrationPhase::Completed
        );
    if first_pass_done {
        return (st.guest_ram_bytes, st.guest_ram_bytes);
    }
    let covered = st
        .pages_sent
        .saturating_add(st.zero_pages_sent)
        .saturating_mul(PAGE_SIZE);
    (covered.min(st.guest_ram_bytes), st.guest_ram_bytes)
}

/// Whether these are the statistics of a cold (offline) migration: no guest RAM moves.
pub fn is_offline(st: &MigrationStats) -> bool {
    st.guest_ram_bytes == 0 && !st.storage.is_empty()
}

/// First line of the live progress display: phase, round and elapsed time, e.g.
/// `PRECOPY round 3  4.21 s`.
pub fn progress_prefix(status: &MigrationStatus) -> String {
    let st = status.stats.clone().unwrap_or_default();
    let phase = phase_name(status.phase());
    if st.rounds > 0 || st.round_pages > 0 {
        format!(
            "{phase:<10} round {:<3} {:>8}",
            st.rounds,
            millis(st.elapsed_ms)
        )
    } else {
        format!("{phase:<10} {:>18}", millis(st.elapsed_ms))
    }
}

/// Transfer line of the live display: pages sent, guest and wire bytes, compression ratio,
/// rate. `29,251 pages  114.3 MiB -> 66.9 MiB wire (1.71x)  260.6 MiB/s`.
/// Disks moving too: `| disks 96.0 MiB of 128.0 MiB -> 40.1 MiB wire` after it.
pub fn progress_transfer(status: &MigrationStatus) -> String {
    let st = status.stats.clone().unwrap_or_default();
    if is_offline(&st) {
        // Cold migration: only disk images move.
        return format!(
            "disks {} of {} -> {} wire ({})  {}",
            bytes(st.disk_bytes_done),
            bytes(st.disk_bytes_total),
            bytes(st.disk_wire_bytes),
            ratio(st.compression_ratio),
            rate(st.throughput_bytes_per_sec)
        );
    }
    let mut line = format!(
        "{} pages  {} -> {} wire ({})  {}",
        count(st.pages_sent),
        bytes(st.page_bytes),
        bytes(st.wire_bytes),
        ratio(st.compression_ratio),
        rate(st.throughput_bytes_per_sec)
    );
    if st.disk_bytes_total > 0 {
        line.push_str(&format!(
            " | disks {} of {} -> {} wire",
            bytes(st.disk_bytes_done),
            bytes(st.disk_bytes_total),
            bytes(st.disk_wire_bytes)
        ));
    }
    line
}

/// Convergence line of the live display: dirty rate, last round's dirty pages, expected
/// downtime. `dirty 2,100 pages/s (8.2 MiB/s)  last round 320 pages  downtime ~9 ms`.
pub fn progress_dirty(status: &MigrationStatus) -> String {
    let st = status.stats.clone().unwrap_or_default();
    if is_offline(&st) {
        return format!(
            "skipped {} (holes, zeros)  already on the target {}",
            bytes(st.disk_bytes_skipped),
            bytes(st.disk_bytes_resumed)
        );
    }
    let mut parts = vec![format!("dirty {}", dirty_rate(st.dirty_rate_pages_per_sec))];
    if st.rounds > 1 || st.last_round_dirty_pages > 0 {
        parts.push(format!(
            "last round {} pages",
            count(st.last_round_dirty_pages)
        ));
    }
    if st.expected_downtime_ms > 0 {
        parts.push(format!("downtime ~{}", millis(st.expected_downtime_ms)));
    }
    if st.eta_ms > 0 && status.phase() == MigrationPhase::Precopy {
        parts.push(format!("ETA {}", millis(st.eta_ms)));
    }
    parts.join("  ")
}

/// The whole live display on one line, for logs (stderr not a terminal).
pub fn progress_line(status: &MigrationStatus) -> String {
    format!(
        "{} | {} | {}",
        progress_prefix(status)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        progress_transfer(status),
        progress_dirty(status)
    )
}

/// What a non-completed final phase means for the VM, in one sentence.
fn outcome_note(status: &MigrationStatus) -> Option<String> {
    let source = or_dash(&status.source);
    let target = or_dash(&status.target);
    let offline = status.stats.as_ref().is_some_and(is_offline);
    match status.phase() {
        MigrationPhase::Failed | MigrationPhase::Cancelled if offline => Some(format!(
            "VM {} stays defined on the source {source}, stopped, its images unchanged{}",
            status.vm,
            if status.phase() == MigrationPhase::Failed { "; what reached the target is kept there, so a new attempt resumes" } else { "" }
        )),
        MigrationPhase::Failed => Some(format!("rolled back: VM {} keeps running on the source {source}", status.vm)),
        MigrationPhase::Cancelled => {
            Some(format!("cancelled and rolled back: VM {} keeps running on the source {source}", status.vm))
        }
        MigrationPhase::InDoubt => Some(format!(
            "the commit outcome on the target {target} is unknown: VM {} stays PAUSED on the source {source} \
             (never on two hosts) while the source agent keeps asking the target; it ends COMPLETED or \
             FAILED by itself once the target answers (`ferryctl migrations watch ID` follows it)",
            status.vm
        )),
        _ => None,
    }
}

/// The final report of a migration: result (with the error, prominently, when it did not
/// complete) and every statistic.
pub fn final_report(status: &MigrationStatus) -> String {
    let st = status.stats.clone().unwrap_or_default();
    let phase = status.phase();
    let mut o = String::new();
    if phase != MigrationPhase::Completed && is_terminal(phase) {
        let _ = writeln!(
            o,
            "*** MIGRATION {} ***",
            phase_name(phase).replace('_', " ")
        );
        let _ = writeln!(
            o,
            "error: {}",
            if status.error.is_empty() {
                "(no error message from the agent)"
            } else {
                &status.error
            }
        );
        if let Some(note) = outcome_note(status) {
            let _ = writeln!(o, "{note}");
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "migration {} of VM {}: {} -> {}",
        or_dash(&status.id),
        or_dash(&status.vm),
        or_dash(&status.source),
        or_dash(&status.target)
    );
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "  {k:<18}{v}");
    };
    kv(
        if is_terminal(phase) {
            "result"
        } else {
            "phase (running)"
        },
        phase_name(phase).to_string(),
    );
    if !is_terminal(phase) && !status.message.is_empty() {
        kv("latest event", status.message.clone());
    }
    if is_terminal(phase) && is_offline(&st) && !status.message.is_empty() {
        // Where the VM and its images are now (cold migrations say it in the message).
        kv("outcome", status.message.clone());
    }
    stats_lines(&st, phase, &mut kv);
    kv("started", unix_ms(status.started_unix_ms));
    kv("finished", unix_ms(status.finished_unix_ms));
    o
}

fn stats_lines(st: &MigrationStats, phase: MigrationPhase, kv: &mut dyn FnMut(&str, String)) {
    kv("total time", millis(st.elapsed_ms));
    if st.preflight_ms > 0 {
        kv("preflight", millis(st.preflight_ms));
    }
    if !st.storage.is_empty() && st.storage != "none" {
        kv("storage", st.storage.clone());
    }
    if st.disk_bytes_total > 0 {
        kv(
            "disk bytes",
            format!(
                "{} of {} -> {} wire",
                bytes(st.disk_bytes_done),
                bytes(st.disk_bytes_total),
                bytes(st.disk_wire_bytes)
            ),
        );
    }
    if is_offline(st) {
        // Cold migration: no guest RAM, no downtime; what the copy skipped and resumed.
        kv(
            "disk detail",
            format!(
                "{} skipped (holes, zeros), {} already on the target",
                bytes(st.disk_bytes_skipped),
                bytes(st.disk_bytes_resumed)
            ),
        );
        kv("compression", ratio(st.compression_ratio));
        kv("codec", or_dash(&st.codec).to_string());
        kv("throughput", rate(st.throughput_bytes_per_sec));
        return;
    }
    let downtime = if st.downtime_ms == 0 && phase != MigrationPhase::Completed {
        "-".to_string()
    } else {
        millis(st.downtime_ms)
    };
    let expected = if st.expected_downtime_ms > 0 {
        format!(" (expected {})", millis(st.expected_downtime_ms))
    } else {
        String::new()
    };
    kv("downtime", format!("{downtime}{expected}"));
    if let Some(b) = st.downtime_breakdown.as_ref().filter(|b| b.commit_us > 0) {
        // Each step's end, measured from the moment the source guest stopped.
        let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
        kv(
            "  pause timeline",
            format!(
                "QEMU ready {} ms, device-state save from {} ms, source fenced {} ms, last pages {} ms, device state {} ms, digests {} ms, resumed {} ms",
                ms(b.pre_switchover_us),
                ms(b.continue_us),
                ms(b.fence_us),
                ms(b.final_round_us),
                ms(b.device_state_us),
                ms(b.verify_us),
                ms(b.commit_us)
            ),
        );
    }
    if !st.policy_applied.is_empty() {
        kv("policy", st.policy_applied.clone());
    }
    kv("guest RAM", bytes(st.guest_ram_bytes));
    kv(
        "pages sent",
        format!(
            "{} (resent {}, zero {}, left to the next round {})",
            count(st.pages_sent),
            count(st.pages_resent),
            count(st.zero_pages_sent),
            count(st.pages_skipped)
        ),
    );
    kv("page bytes", bytes(st.page_bytes));
    kv("wire bytes", bytes(st.wire_bytes));
    kv("device state", bytes(st.device_state_bytes));
    kv("compression", ratio(st.compression_ratio));
    kv("codec", or_dash(&st.codec).to_string());
    kv("rounds", st.rounds.to_string());
    kv("throughput", rate(st.throughput_bytes_per_sec));
    kv("dirty rate", dirty_rate(st.dirty_rate_pages_per_sec));
    kv(
        "last round dirty",
        format!("{} pages", count(st.last_round_dirty_pages)),
    );
    kv("tracker", or_dash(&st.tracker).to_string());
    if !st.verify.is_empty() {
        let audit = if st.audited_pages > 0 {
            format!(
                " (tracker audit: {} pages re-hashed)",
                count(st.audited_pages)
            )
        } else {
            String::new()
        };
        kv("verify", format!("{}{audit}", st.verify));
    }
    let digest = if st.ram_digest.is_empty() {
        "- (not compared)".to_string()
    } else if phase == MigrationPhase::Completed {
        format!("{} (verified: equal on both sides)", st.ram_digest)
    } else {
        st.ram_digest.clone()
    };
    kv("RAM digest", digest);
}

/// `ferryctl preflight`: one line per check (status, name, detail, fix), then the prediction.
pub fn preflight_report(r: &ferry_api::v1::PreflightReport) -> String {
    use ferry_api::v1::CheckStatus;
    let mut out = String::new();
    for c in &r.checks {
        let status = match CheckStatus::try_from(c.status) {
            Ok(CheckStatus::Pass) => "pass",
            Ok(CheckStatus::Warn) => "WARN",
            Ok(CheckStatus::Fail) if c.soft => "FAIL (soft)",
            Ok(CheckStatus::Fail) => "FAIL",
            _ => "?",
        };
        out.push_str(&format!("{status:<12} {:<13} {}\n", c.name, c.detail));
        if !c.fix.is_empty() && c.status != CheckStatus::Pass as i32 {
            out.push_str(&format!("{:<26} fix: {}\n", "", c.fix));
        }
    }
    if let Some(p) = &r.prediction {
        if p.link_bytes_per_sec > 0.0 {
            out.push_str(&format!(
                "prediction   link {}/s, RTT {:.1} ms, guest writes {}/s, ratio {:.2}x: {}\n",
                bytes(p.link_bytes_per_sec as u64),
                p.rtt_ms,
                bytes((p.dirty_pages_per_sec * 4096.0) as u64),
                p.codec_ratio,
                if p.converges {
                    format!(
                        "converges in ~{} rounds, ~{} total, ~{} downtime",
                        p.predicted_rounds,
                        millis(p.predicted_total_ms),
                        millis(p.predicted_downtime_ms)
                    )
                } else {
                    "does NOT converge".to_string()
                }
            ));
        }
    }
    out.push_str(if r.ok {
        "result       ready to migrate\n"
    } else if r.ok_with_force {
        "result       only soft checks failed: migrate --force would proceed\n"
    } else {
        "result       blocked\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(512 * 1024 * 1024), "512.0 MiB");
        assert_eq!(bytes(2 * 1024 * 1024 * 1024), "2.00 GiB");
        assert_eq!(bytes(3 * 1024u64.pow(4) / 2), "1.50 TiB");
        assert_eq!(bytes(u64::MAX), "16.00 EiB");
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(rate(0.0), "-");
        assert_eq!(rate(f64::NAN), "-");
        assert_eq!(rate(-5.0), "-");
        assert_eq!(rate(100.0), "100 B/s");
        assert_eq!(rate(130.25 * 1024.0 * 1024.0), "130.2 MiB/s");
        assert_eq!(ratio(0.0), "-");
        assert_eq!(ratio(f64::INFINITY), "-");
        assert_eq!(ratio(1.8234), "1.82x");
        assert_eq!(ratio(1.0), "1.00x");
        assert_eq!(dirty_rate(0.0), "-");
        assert_eq!(dirty_rate(2100.0), "2,100 pages/s (8.2 MiB/s)");
    }

    #[test]
    fn durations() {
        assert_eq!(millis(0), "0 ms");
        assert_eq!(millis(11), "11 ms");
        assert_eq!(millis(999), "999 ms");
        assert_eq!(millis(1000), "1.00 s");
        assert_eq!(millis(4210), "4.21 s");
        assert_eq!(millis(59_999), "60.00 s");
        assert_eq!(millis(123_000), "2m 03s");
        assert_eq!(millis(3_723_000), "1h 02m 03s");
        assert_eq!(duration(Duration::from_micros(1500)), "1 ms");
    }

    #[test]
    fn counts_and_times() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(140_233), "140,233");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(unix_ms(0), "-");
        assert_eq!(unix_ms(-1), "-");
        assert_eq!(unix_ms(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn names() {
        assert_eq!(phase_name(MigrationPhase::Precopy), "PRECOPY");
        assert_eq!(phase_name(MigrationPhase::InDoubt), "IN_DOUBT");
        assert_eq!(vm_state_name(VmState::Running), "RUNNING");
        assert!(is_terminal(MigrationPhase::Cancelled));
        assert!(!is_terminal(MigrationPhase::Switchover));
        assert_eq!(exit_code(MigrationPhase::Completed), 0);
        assert_eq!(exit_code(MigrationPhase::Failed), 1);
        assert_eq!(exit_code(MigrationPhase::Cancelled), 3);
        assert_eq!(exit_code(MigrationPhase::InDoubt), 4);
        assert_eq!(exit_code(MigrationPhase::Precopy), 1);
    }

    #[test]
    fn offline_report_shows_disks_not_ram() {
        let status = MigrationStatus {
            id: "m1".into(),
            vm: "web".into(),
            source: "a".into(),
            target: "b".into(),
            phase: MigrationPhase::Completed as i32,
            message:
                "VM 'web' is now running on b; a keeps its definition (stopped) and image files"
                    .into(),
            stats: Some(MigrationStats {
                storage: "copied".into(),
                disk_bytes_total: 200 << 20,
                disk_bytes_done: 200 << 20,
                disk_wire_bytes: 88 << 20,
                disk_bytes_skipped: 1 << 20,
                disk_bytes_resumed: 46 << 20,
                codec: "zstd:3".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = final_report(&status);
        assert!(
            r.contains("disk bytes        200.0 MiB of 200.0 MiB -> 88.0 MiB wire"),
            "{r}"
        );
        assert!(
            r.contains("1.0 MiB skipped (holes, zeros), 46.0 MiB already on the target"),
            "{r}"
        );
        assert!(
            r.contains("outcome           VM 'web' is now running on b"),
            "{r}"
        );
        assert!(!r.contains("guest RAM") && !r.contains("downtime"), "{r}");
        assert_eq!(progress_position(&status), (200 << 20, 200 << 20));
        assert!(
            progress_line(&status).contains("disks 200.0 MiB of 200.0 MiB -> 88.0 MiB wire"),
            "{}",
            progress_line(&status)
        );
        assert!(
            !progress_line(&status).contains("pages"),
            "{}",
            progress_line(&status)
        );
        let mut failed = status.clone();
        failed.phase = MigrationPhase::Failed as i32;
        assert!(
            final_report(&failed).contains("stays defined on the source a, stopped"),
            "{}",
            final_report(&failed)
        );
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONG"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONG\nxxx  1\ny    22\n");
    }

    fn vm() -> VmInfo {
        VmInfo {
            spec: Some(ferry_api::v1::VmSpec {
                name: "web01".into(),
                vcpus: 2,
                memory_mib: 512,
                kernel: "/k".into(),
                disks: vec![ferry_api::v1::DiskSpec {
                    id: "disk0".into(),
                    path: "/d.raw".into(),
                    format: "raw".into(),
                    read_only: true,
                }],
                nics: vec![ferry_api::v1::NicSpec {
                    id: "net0".into(),
                    mac: String::new(),
                    bridge: "br0".into(),
                }],
                ..Default::default()
            }),
            state: VmState::Running as i32,
            pid: 4242,
            qmp_socket: "/s/qmp.sock".into(),
            console_socket: "/s/console.sock".into(),
            console_log: "/s/console.log".into(),
            ram_file: "/dev/shm/ferry/web01.ram".into(),
            resume_latency_us: 0,
            fenced: String::new(),
        }
    }

    #[test]
    fn vm_output() {
        let t = vm_table(&[vm(), VmInfo::default()]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NAME   STATE        VCPUS  MEMORY     PID");
        assert_eq!(lines[1], "web01  RUNNING      2      512.0 MiB  4242");
        assert_eq!(lines[2], "       UNSPECIFIED  0      0 B        -");
        let d = vm_details(&vm());
        for want in [
            "state           RUNNING",
            "pid             4242",
            "console socket  /s/console.sock",
            "ram file        /dev/shm/ferry/web01.ram",
            "disk disk0      /d.raw (raw, read-only)",
            "nic net0        bridge br0, auto MAC",
            "cpu model       (default)",
            "memory          512 MiB\n",
        ] {
            assert!(d.contains(want), "missing {want:?} in\n{d}");
        }
        let mut pre = vm();
        if let Some(s) = pre.spec.as_mut() {
            s.memory_prealloc = true;
        }
        let d = vm_details(&pre);
        assert!(
            d.contains("memory          512 MiB (preallocated)\n"),
            "{d}"
        );
        assert!(!d.contains("fence"), "{d}");
        // A fenced copy is marked in the list and `show` says why.
        let mut fenced = vm();
        fenced.state = VmState::Paused as i32;
        fenced.fenced =
            "fenced: migration m1 committed here, then its source a took the VM back".into();
        assert!(
            vm_table(&[fenced.clone()]).contains("PAUSED (fenced)"),
            "{}",
            vm_table(&[fenced.clone()])
        );
        let d = vm_details(&fenced);
        assert!(d.contains("fence           fenced: migration m1"), "{d}");
    }

    fn status(phase: MigrationPhase) -> MigrationStatus {
        MigrationStatus {
            id: "m-1".into(),
            vm: "web01".into(),
            source: "alpha".into(),
            target: "beta".into(),
            phase: phase as i32,
            stats: Some(MigrationStats {
                guest_ram_bytes: 512 << 20,
                pages_sent: 140_233,
                zero_pages_sent: 3000,
                pages_resent: 12_001,
                pages_skipped: 2_500,
                page_bytes: 140_233 * 4096,
                wire_bytes: 300 << 20,
                device_state_bytes: 600 << 10,
                rounds: 7,
                last_round_dirty_pages: 320,
                dirty_rate_pages_per_sec: 2100.0,
                throughput_bytes_per_sec: 130.0 * 1048576.0,
                compression_ratio: 1.826,
                elapsed_ms: 4210,
                downtime_ms: 11,
                expected_downtime_ms: 9,
                codec: "zstd:1".into(),
                tracker: "uffd-wp".into(),
                ram_digest: "ab12".into(),
                downtime_breakdown: None,
                policy_applied: String::new(),
                prediction: None,
                ..Default::default()
            }),
            error: String::new(),
            message: "round 7".into(),
            started_unix_ms: 1_700_000_000_000,
            finished_unix_ms: 1_700_000_004_210,
        }
    }

    #[test]
    fn completed_report() {
        let r = final_report(&status(MigrationPhase::Completed));
        assert!(!r.contains("***"), "{r}");
        for want in [
            "migration m-1 of VM web01: alpha -> beta",
            "result            COMPLETED",
            "total time        4.21 s",
            "downtime          11 ms (expected 9 ms)",
            "guest RAM         512.0 MiB",
            "pages sent        140,233 (resent 12,001, zero 3,000, left to the next round 2,500)",
            "page bytes        547.8 MiB",
            "wire bytes        300.0 MiB",
            "compression       1.83x",
            "codec             zstd:1",
            "rounds            7",
            "tracker           uffd-wp",
            "RAM digest        ab12 (verified: equal on both sides)",
        ] {
            assert!(r.contains(want), "missing {want:?} in\n{r}");
        }
    }

    #[test]
    fn failed_reports_are_prominent() {
        let mut s = status(MigrationPhase::Failed);
        s.error = "beta: preflight: bridge br0 missing".into();
        let r = final_report(&s);
        assert!(
            r.starts_with("*** MIGRATION FAILED ***\nerror: beta: preflight: bridge br0 missing\n"),
            "{r}"
        );
        assert!(r.contains("keeps running on the source alpha"), "{r}");
        assert!(
            r.contains("RAM digest        ab12\n"),
            "not verified when failed: {r}"
        );

        let mut s = status(MigrationPhase::InDoubt);
        s.error = "commit: beta unreachable".into();
        let r = final_report(&s);
        assert!(r.starts_with("*** MIGRATION IN DOUBT ***"), "{r}");
        assert!(
            r.contains("stays PAUSED on the source alpha (never on two hosts) while the source agent keeps asking"),
            "{r}"
        );

        let mut s = status(MigrationPhase::Cancelled);
        s.stats = None;
        let r = final_report(&s);
        assert!(
            r.contains("error: (no error message from the agent)"),
            "{r}"
        );
        assert!(r.contains("downtime          -\n"), "{r}");
        assert!(r.contains("RAM digest        - (not compared)"), "{r}");
    }

    #[test]
    fn progress_display() {
        let mut s = status(MigrationPhase::Precopy);
        assert_eq!(
            progress_position(&s),
            (512 << 20, 512 << 20),
            "round 7: full"
        );
        if let Some(st) = s.stats.as_mut() {
            st.pages_sent = 1000;
            st.zero_pages_sent = 24;
            st.rounds = 1;
        }
        assert_eq!(progress_position(&s), (1024 * 4096, 512 << 20));
        s.phase = MigrationPhase::Switchover as i32;
        assert_eq!(progress_position(&s), (512 << 20, 512 << 20));
        s.phase = MigrationPhase::Precopy as i32;
        assert_eq!(progress_prefix(&s), "PRECOPY    round 1     4.21 s");
        assert_eq!(
            progress_transfer(&s),
            "1,000 pages  547.8 MiB -> 300.0 MiB wire (1.83x)  130.0 MiB/s"
        );
        assert_eq!(
            progress_dirty(&s),
            "dirty 2,100 pages/s (8.2 MiB/s)  last round 320 pages  downtime ~9 ms"
        );
        assert_eq!(
            progress_line(&s),
            "PRECOPY round 1 4.21 s | 1,000 pages  547.8 MiB -> 300.0 MiB wire (1.83x)  130.0 MiB/s \
             | dirty 2,100 pages/s (8.2 MiB/s)  last round 320 pages  downtime ~9 ms"
        );
        let empty = MigrationStatus {
            phase: MigrationPhase::Preparing as i32,
            ..Default::default()
        };
        assert_eq!(progress_position(&empty), (0, 0));
        assert_eq!(progress_prefix(&empty), "PREPARING                0 ms");
        assert_eq!(progress_transfer(&empty), "0 pages  0 B -> 0 B wire (-)  -");
        assert_eq!(progress_dirty(&empty), "dirty -");
    }

    #[test]
    fn progress_within_round_0() {
        // What the agent sends every 250 ms while round 0 runs: the round's own pages.
        let mut s = status(MigrationPhase::Precopy);
        if let Some(st) = s.stats.as_mut() {
            st.rounds = 0;
            st.round_pages = 40_000;
            st.round_pages_done = 10_000;
            st.eta_ms = 3250;
            st.last_round_dirty_pages = 0;
        }
        assert_eq!(progress_position(&s), (10_000 * 4096, 40_000 * 4096));
        assert_eq!(progress_prefix(&s), "PRECOPY    round 0     4.21 s");
        assert!(
            progress_dirty(&s).ends_with("downtime ~9 ms  ETA 3.25 s"),
            "{}",
            progress_dirty(&s)
        );
        // No ETA once the guest is paused.
        s.phase = MigrationPhase::Switchover as i32;
        assert!(!progress_dirty(&s).contains("ETA"));
    }

    #[test]
    fn migration_list() {
        let t = migration_table(&[status(MigrationPhase::Completed)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0]
                .starts_with("ID   VM     SOURCE  TARGET  PHASE      ELAPSED  DOWNTIME  STARTED"),
            "{t}"
        );
        assert!(
            lines[1].starts_with(
                "m-1  web01  alpha   beta    COMPLETED  4.21 s   11 ms     2023-11-14T22:13:20Z"
            ),
            "{t}"
        );
    }
}
