//! Preflight: before a migration starts, the source gathers the target's facts (peer
//! `HostFacts`), probes the data path, measures the guest's dirty rate and the codec on
//! the guest's own pages, and produces a table of checks and a convergence prediction.
//!
//! Every check says what was found and what to do. Hard failures block the migration;
//! soft ones (`soft = true`) can be overridden with `force`.

use crate::AgentCtx;
use ferry_api::v1 as pb;
use ferry_api::v1::ferry_peer_client::FerryPeerClient;
use ferry_memory::{RamFile, DEFAULT_SHIM_FD, PAGE_SIZE};
use ferry_qemu::{NicBackend, QemuProcess, VmSpec};
use ferry_transport::write_stream_header;
use ferry_wire::{Codec, StreamHeader, StreamKind, PROTOCOL_VERSION};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// CPU features worth comparing (cpuinfo names). Virtualisation flags (svm, vmx) and
/// QEMU-internal properties are left out: QEMU drops those quietly when the host lacks them.
const CPU_FEATURES: &[&str] = &[
    "fpu",
    "vme",
    "de",
    "pse",
    "tsc",
    "msr",
    "pae",
    "mce",
    "cx8",
    "apic",
    "sep",
    "mtrr",
    "pge",
    "mca",
    "cmov",
    "pat",
    "pse36",
    "clflush",
    "mmx",
    "fxsr",
    "sse",
    "sse2",
    "ss",
    "syscall",
    "nx",
    "mmxext",
    "fxsr_opt",
    "pdpe1gb",
    "rdtscp",
    "lm",
    "pni",
    "pclmulqdq",
    "ssse3",
    "fma",
    "cx16",
    "sse4_1",
    "sse4_2",
    "x2apic",
    "movbe",
    "popcnt",
    "aes",
    "xsave",
    "avx",
    "f16c",
    "rdrand",
    "lahf_lm",
    "abm",
    "sse4a",
    "3dnowprefetch",
    "fsgsbase",
    "bmi1",
    "avx2",
    "smep",
    "bmi2",
    "erms",
    "invpcid",
    "avx512f",
    "avx512dq",
    "rdseed",
    "adx",
    "smap",
    "clflushopt",
    "clwb",
    "avx512cd",
    "sha_ni",
    "avx512bw",
    "avx512vl",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "umip",
    "pku",
    "avx512vbmi",
    "gfni",
    "vaes",
    "vpclmulqdq",
];

/// The features the seeds single out: checked and named first.
const KEY_FEATURES: &[&str] = &["lm", "nx"];

/// QEMU property name to cpuinfo name.
pub fn normalize_feature(name: &str) -> String {
    let n = name.to_ascii_lowercase().replace(['-', '.'], "_");
    match n.as_str() {
        "sse3" => "pni".into(),
        "xd" => "nx".into(),
        "i64" => "lm".into(),
        _ => n,
    }
}

/// Vendor and feature flags of this host's first CPU in /proc/cpuinfo.
fn cpuinfo() -> (String, Vec<String>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        text.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    (
        field("vendor_id"),
        field("flags")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

fn bridges() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("bridge").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Guest RAM the VMs on a host may still take: each one's size less what its RAM file
/// holds, `(size, held)` per VM. A guest's RAM is allocated as it writes it (unless
/// preallocated), so the room it has not taken yet is promised to it. Pure; the caller
/// measures.
pub fn ram_promised(vms: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    vms.into_iter()
        .map(|(size, held)| size.saturating_sub(held))
        .fold(0u64, u64::saturating_add)
}

/// Admission of a guest's RAM on a host: `need` bytes of RAM file must fit in the RAM
/// directory (`ram_dir_free`, 0 when unknown) and in available memory less `reserve`
/// (tmpfs pages are memory), beside the `promised` bytes the guests already there may
/// still take ([`ram_promised`]). Pure; the caller measures.
pub fn memory_admission(
    need: u64,
    mem_available: u64,
    ram_dir_free: u64,
    reserve: u64,
    promised: u64,
) -> Result<(), String> {
    let want = need.saturating_add(promised);
    let beside = if promised > 0 {
        format!(
            " beside the {} MiB the guests already there may still take",
            promised >> 20
        )
    } else {
        String::new()
    };
    let mem = mem_available.saturating_sub(reserve);
    if want > mem {
        return Err(format!(
            "{} MiB of guest RAM do not fit{beside}: {} MiB available, {} MiB of it kept in reserve (migration.memory_reserve_mib)",
            need >> 20,
            mem_available >> 20,
            reserve >> 20
        ));
    }
    if ram_dir_free != 0 && want > ram_dir_free {
        return Err(format!(
            "{} MiB of guest RAM do not fit in the RAM directory{beside}: {} MiB free there",
            need >> 20,
            ram_dir_free >> 20
        ));
    }
    Ok(())
}

/// MemAvailable of this host, bytes (0 if unknown).
pub fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process has used; 0 if unknown.
pub fn own_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces, so split after its ')').
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')'.
    let ticks: u64 = f
        .get(11..13)
        .map(|v| v.iter().filter_map(|x| x.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        0.0
    } else {
        ticks as f64 / hz as f64
    }
}

/// Free bytes of the filesystem holding `path` (0 if unknown).
pub fn fs_free(path: &Path) -> u64 {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// This host's facts, as reported to a peer.
pub async fn host_facts(ctx: &AgentCtx) -> pb::HostFacts {
    let (vendor, flags) = cpuinfo();
    let pf = &ctx.cfg.preflight;
    let (cpu_features, source) = match (&pf.cpu_features, ctx.cfg.accel.as_str()) {
        (Some(f), _) => (
            f.clone(),
            "configured ([preflight] cpu_features)".to_string(),
        ),
        // What KVM can give guests, where /dev/kvm answers; else what the host CPU has.
        (None, "kvm") => match tokio::task::spawn_blocking(crate::cpuid::kvm_supported).await {
            Ok(Ok((_, names))) => (names, "KVM_GET_SUPPORTED_CPUID".to_string()),
            Ok(Err(e)) => (flags, format!("/proc/cpuinfo ({e})")),
            Err(e) => (flags, format!("/proc/cpuinfo ({e})")),
        },
        (None, _) => (Vec::new(), "tcg (QEMU emulates the CPU model)".to_string()),
    };
    let own = ctx.identity.peer_identity();
    pb::HostFacts {
        host_name: ctx.cfg.host_name.clone(),
        protocol_version: u32::from(PROTOCOL_VERSION),
        qemu_version: ctx.qemu_version.clone(),
        machine_types: ctx.machine_types.clone(),
        accel: ctx.cfg.accel.clone(),
        cpu_vendor: pf.cpu_vendor.clone().unwrap_or(vendor),
        cpu_features,
        cpu_features_source: source,
        bridges: bridges(),
        mem_available_bytes: mem_available(),
        ram_dir_free_bytes: fs_free(&ctx.cfg.ram_dir),
        vm_names: ctx
            .vms
            .list()
            .await
            .into_iter()
            .filter_map(|v| v.spec.map(|s| s.name))
            .collect(),
        quic_addr: ctx.cfg.quic_listen.to_string(),
        cert_identity: match &own {
            Ok(i) => format!("{} {}", i.role, i.name),
            Err(e) => e.to_string(),
        },
        cert_not_after_unix: own.as_ref().map(|i| i.not_after_unix).unwrap_or(0),
        ram_reserve_bytes: ctx.cfg.migration.memory_reserve_mib << 20,
        agent_cpu_seconds: own_cpu_seconds(),
        ram_promised_bytes: ctx.vms.ram_promised().await,
        storage_roots: ctx
            .cfg
            .storage_roots
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        tracker: match &ctx.tracker {
            Ok(k) => k.name().to_string(),
            Err(e) => format!("none: {e}"),
        },
    }
}

/// The guest CPU model's features, expanded by the VM's own QEMU.
async fn guest_cpu_features(proc: &QemuProcess, model: &str) -> Result<BTreeSet<String>, String> {
    let args = serde_json::json!({"type": "full", "model": {"name": model}});
    let r = proc
        .qmp()
        .execute("query-cpu-model-expansion", Some(args))
        .await
        .map_err(|e| e.to_string())?;
    let props = r
        .pointer("/model/props")
        .and_then(|p| p.as_object())
        .ok_or("no props in query-cpu-model-expansion")?;
    Ok(props
        .iter()
        .filter(|(_, v)| v.as_bool() == Some(true))
        .map(|(k, _)| normalize_feature(k))
        .filter(|f| CPU_FEATURES.contains(&f.as_str()))
        .collect())
}

fn check(
    name: &str,
    status: pb::CheckStatus,
    detail: String,
    fix: &str,
    soft: bool,
) -> pb::PreflightCheck {
    pb::PreflightCheck {
        name: name.into(),
        status: status as i32,
        detail,
        fix: fix.into(),
        soft,
    }
}

use pb::CheckStatus::{Fail, Pass, Warn};

/// The checks that compare the VM with the target's facts (no I/O: unit-testable).
pub fn compare(
    spec: &VmSpec,
    guest_features: Option<&BTreeSet<String>>,
    source_vendor: &str,
    source_accel: &str,
    t: &pb::HostFacts,
) -> Vec<pb::PreflightCheck> {
    let host = &t.host_name;
    let mut out = Vec::new();
    out.push(
        if ferry_wire::version_supported(t.protocol_version.min(255) as u8) {
            check(
                "protocol",
                Pass,
                format!(
                    "both speak ferry data-plane protocol {}",
                    t.protocol_version
                ),
                "",
                false,
            )
        } else {
            check(
                "protocol",
                Fail,
                format!(
                    "host {host} speaks protocol {}, this host {PROTOCOL_VERSION}",
                    t.protocol_version
                ),
                "upgrade ferryd so both hosts run compatible versions",
                false,
            )
        },
    );
    out.push(if t.vm_names.iter().any(|n| n == &spec.name) {
        check(
            "vm-name",
            Fail,
            format!("a VM named '{}' is already defined on {host}", spec.name),
            "undefine it on the target, or rename one of them",
            false,
        )
    } else {
        check(
            "vm-name",
            Pass,
            format!("'{}' is free on {host}", spec.name),
            "",
            false,
        )
    });
    out.push(if t.machine_types.iter().any(|m| m == &spec.machine) {
        check(
            "machine",
            Pass,
            format!(
                "{host}'s QEMU {} has machine type {}",
                t.qemu_version, spec.machine
            ),
            "",
            false,
        )
    } else {
        check(
            "machine",
            Fail,
            format!(
                "{host}'s QEMU {} lacks machine type {}",
                t.qemu_version, spec.machine
            ),
            "pin a machine type both QEMU versions have (e.g. pc-i440fx-7.2)",
            false,
        )
    });
    if !t.tracker.starts_with("none") || t.tracker.is_empty() {
        out.push(check(
            "tracker",
            Pass,
            format!("{host} can track dirty pages ({})", t.tracker),
            "",
            false,
        ));
    } else {
        out.push(check(
            "tracker",
            Warn,
            format!(
                "{host} has no dirty tracker ({}): it can receive but not send live",
                t.tracker
            ),
            "",
            true,
        ));
    }
    // CPU: vendor, then the features the guest's model uses.
    let kvm = t.accel == "kvm" || source_accel == "kvm";
    let configured = t.cpu_features_source.starts_with("configured");
    if !t.cpu_vendor.is_empty() && !source_vendor.is_empty() && t.cpu_vendor != source_vendor {
        let status = if kvm { Fail } else { Warn };
        out.push(check(
            "cpu-vendor",
            status,
            format!(
                "CPU vendor differs: {source_vendor} here, {} on {host}",
                t.cpu_vendor
            ),
            "migrate between hosts of the same CPU vendor",
            false,
        ));
    }
    match guest_features {
        None => out.push(check(
            "cpu",
            Warn,
            "the VM is not running: its CPU model was not expanded".into(),
            "",
            true,
        )),
        Some(features) if t.cpu_features.is_empty() && !configured => out.push(check(
            "cpu",
            Pass,
            format!(
                "{host} emulates the CPU model ({}); {} guest features not compared",
                t.cpu_features_source,
                features.len()
            ),
            "",
            false,
        )),
        Some(features) => {
            let offered: BTreeSet<String> = t
                .cpu_features
                .iter()
                .map(|f| normalize_feature(f))
                .collect();
            let mut missing: Vec<&String> =
                features.iter().filter(|f| !offered.contains(*f)).collect();
            missing.sort_by_key(|f| (!KEY_FEATURES.contains(&f.as_str()), f.as_str().to_string()));
            out.push(if missing.is_empty() {
                check("cpu", Pass, format!("{host} offers all {} features of CPU model {}", features.len(), spec.cpu_model), "", false)
            } else {
                let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
                check(
                    "cpu",
                    Fail,
                    format!("{host} lacks CPU features the guest ({}) uses: {} (from {})", spec.cpu_model, names.join(", "), t.cpu_features_source),
                    "pick a CPU model both hosts support (e.g. a named baseline model), or another target",
                    false,
                )
            });
        }
    }
    // Networks the VM's NICs use.
    let wanted: Vec<&str> = spec
        .nics
        .iter()
        .filter_map(|n| match &n.backend {
            NicBackend::Bridge { name } => Some(name.as_str()),
            NicBackend::User => None,
        })
        .collect();
    let absent: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|b| !t.bridges.iter().any(|x| x == b))
        .collect();
    out.push(if absent.is_empty() {
        check(
            "bridges",
            Pass,
            if wanted.is_empty() {
                "the VM uses no host bridge".into()
            } else {
                format!("{host} has bridge(s) {}", wanted.join(", "))
            },
            "",
            false,
        )
    } else {
        check(
            "bridges",
            Fail,
            format!("bridge(s) {} do not exist on {host}", absent.join(", ")),
            "create the bridge on the target (same name) or change the VM's NIC",
            false,
        )
    });
    // Memory for the RAM file: the target's own admission rule.
    let need = spec.memory_mib << 20;
    let free = t.mem_available_bytes.min(if t.ram_dir_free_bytes == 0 {
        u64::MAX
    } else {
        t.ram_dir_free_bytes
    });
    out.push(
        match memory_admission(
            need,
            t.mem_available_bytes,
            t.ram_dir_free_bytes,
            t.ram_reserve_bytes,
            t.ram_promised_bytes,
        ) {
            Ok(()) => check(
                "memory",
                Pass,
                format!(
                    "{host} has {} MiB available for {} MiB of guest RAM",
                    free >> 20,
                    spec.memory_mib
                ),
                "",
                false,
            ),
            Err(why) => check(
                "memory",
                Fail,
                format!("{host}: {why}"),
                "free memory on the target or pick another target",
                false,
            ),
        },
    );
    out
}

/// Sends bytes over a fresh QUIC connection and returns the steady rate (bytes/s) and RTT.
/// The target reports its running count, timestamped on its clock, every 50 ms. The probe lasts 0.8 s, or 40 RTTs
/// on long links (at most 3 s), so the congestion controller gets past its start-up.
async fn probe(
    ctx: &AgentCtx,
    quic_addr: SocketAddr,
    cap: u64,
) -> Result<(f64, f64, f64, f64), String> {
    let conn = ctx
        .quic
        .connect_ip(quic_addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_stream_header(&mut send, StreamHeader::new(StreamKind::Probe, 0))
        .await
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    // The target's reports, timestamped on arrival.
    // (arrival here, bytes, target's timestamp)
    let reports = tokio::spawn(async move {
        let mut v: Vec<(f64, u64, f64)> = Vec::new();
        let mut b = [0u8; 16];
        while recv.read_exact(&mut b).await.is_ok() {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            let at = u64::from_le_bytes(b[8..].try_into().unwrap_or_default()) as f64 / 1e6;
            v.push((start.elapsed().as_secs_f64(), n, at));
        }
        v
    });
    let handshake_rtt = conn.rtt();
    let duration = (handshake_rtt * 40).clamp(Duration::from_millis(800), Duration::from_secs(3));
    let chunk = vec![0x5au8; 256 * 1024];
    let mut sent = 0u64;
    while start.elapsed() < duration && sent < (1 << 30) - chunk.len() as u64 {
        send.write_all(&chunk).await.map_err(|e| e.to_string())?;
        sent += chunk.len() as u64;
        if cap > 0 {
            // Respect the migration's cap while probing.
            let ahead = sent as f64 / cap as f64 - start.elapsed().as_secs_f64();
            if ahead > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(ahead)).await;
            }
        }
    }
    send.finish().map_err(|e| e.to_string())?;
    let v = tokio::time::timeout(Duration::from_secs(30), reports)
        .await
        .map_err(|_| "no answer to the probe".to_string())?
        .map_err(|e| e.to_string())?;
    // The RTT before the probe loaded the path: after it, quinn's estimate includes the
    // queue the probe built (25-40 ms on a 20 ms link), which the pause does not pay.
    let rtt = handshake_rtt.as_secs_f64() * 1000.0;
    let loss = path_loss(&conn);
    conn.close(0u32.into(), b"probe done");
    let (t_end, n_end, at_end) = *v.last().ok_or("the target reported nothing")?;
    // A fresh connection ramps up (slow start, BBR's start-up, worse under loss). Model the
    // bytes moved as `steady × (t - ramp)`: the steady rate from the second half of the
    // probe, the ramp from how far the total falls short of it. Either alone mispredicted
    // by 30-120% on the testbed's wan and far links.
    // The steady rate comes from the target's own timestamps: arrival times here jitter
    // with a busy sender and overestimated a 1 Gbit/s link by 15%.
    // Least-squares slope over the second half: in-order delivery releases bytes held
    // behind a lost packet in bursts, which endpoint differences take for bandwidth.
    let half = at_end / 2.0;
    let pts: Vec<(f64, f64)> = v
        .iter()
        .filter(|r| r.2 >= half)
        .map(|r| (r.2, r.1 as f64))
        .collect();
    let steady = slope(&pts).unwrap_or_else(|| n_end as f64 / at_end.max(1e-6));
    let ramp = (t_end - n_end as f64 / steady.max(1.0)).clamp(0.0, t_end);
    Ok((steady, rtt, ramp * 1000.0, loss))
}

/// The loss a short burst on this connection should expect: the random loss its
/// controller saw (queue overflows do not hit a burst on an idle path), or every loss
/// when the controller cannot tell them apart.
pub fn path_loss(conn: &quinn::Connection) -> f64 {
    ferry_transport::congestion::random_loss_share(conn).unwrap_or_else(|| {
        let path = conn.stats().path;
        if path.sent_packets == 0 {
            0.0
        } else {
            path.lost_packets as f64 / path.sent_packets as f64
        }
    })
}

/// Least-squares slope of y over x; None with fewer than 3 points or no spread in x.
fn slope(pts: &[(f64, f64)]) -> Option<f64> {
    if pts.len() < 3 {
        return None;
    }
    let n = pts.len() as f64;
    let (mx, my) = pts
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Pages written per second by the running guest, with ferry's own tracker.
async fn dirty_rate(ctx: &AgentCtx, spec: &VmSpec, proc: &QemuProcess) -> Result<f64, String> {
    let kind = ctx.tracker.clone()?;
    // Never beside a migration's tracker: see `tracker_claims`.
    let _claim = ctx.trackers.try_claim(&spec.name).ok_or_else(|| {
        format!(
            "VM '{}' is being migrated: its write tracker is in use",
            spec.name
        )
    })?;
    let path = ctx.cfg.ram_path(&spec.name);
    let len = spec.memory_mib << 20;
    let pid = proc.pid() as i32;
    let mut t = kind
        .attach(pid, DEFAULT_SHIM_FD, &path, len)
        .map_err(|e| e.to_string())?;
    t.arm().map_err(|e| e.to_string())?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pages = t.collect().map_err(|e| e.to_string())?.count();
    let _ = t.disarm();
    Ok(pages as f64 / start.elapsed().as_secs_f64())
}

/// QEMU's own estimate (MiB/s), for comparison; 0 when unavailable.
async fn qemu_dirty_rate(proc: &QemuProcess) -> f64 {
    if proc.qmp().calc_dirty_rate(1).await.is_err() {
        return 0.0;
    }
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(info) = proc.qmp().query_dirty_rate().await {
            if info.status.as_deref() == Some("measured") {
                return info.dirty_rate.unwrap_or(0) as f64;
            }
        }
    }
    0.0
}

/// Compression ratio and one core's speed on a sample of the guest's non-zero pages, and
/// the bytes round 0 would send.
fn codec_sample(ram: &RamFile, codec: Codec) -> Result<(f64, f64, u64), String> {
    let nonzero = ram.nonzero_pages().map_err(|e| e.to_string())?;
    let data = crate::migration::auto_codec::read_sample(ram, &nonzero, 2048)
        .map_err(|e| e.to_string())?;
    let s = crate::migration::auto_codec::measure(codec, &data).map_err(|e| e.to_string())?;
    Ok((s.ratio, s.bytes_per_sec, nonzero.count() * PAGE_SIZE as u64))
}

/// QEMU saving its device state in the pause, from the guest's stop to the fence: the
/// final round is collected and written meanwhile. Measured here under TCG (benches/
/// RESULTS.md, the downtime breakdowns of the fifth session of 2026-12-01): 9-17 ms on
/// wan and far, QEMU itself completing 5-7 ms after the stop. (28 ms before: the tracker
/// was unregistered inside the pause.)
pub const DEVICE_SAVE_MS: f64 = 12.0;

/// The device-state save this host measured in its switchovers, for the next predictions
/// ([`learn_device_save`]); 0 until one migration committed from here. The default
/// constant came from another machine: a host twice as fast paused for 30 ms where 41 were
/// predicted (benches/RESULTS.md, third session of 2026-12-01).
#[derive(Debug, Default)]
pub struct DeviceSaveHistory(std::sync::Mutex<f64>);

impl DeviceSaveHistory {
    /// What to predict with (0: nothing measured yet).
    pub fn get(&self) -> f64 {
        self.0.lock().map(|v| *v).unwrap_or(0.0)
    }

    /// Takes in one switchover's measured save.
    pub fn record(&self, measured_ms: f64) {
        if let Ok(mut v) = self.0.lock() {
            *v = learn_device_save(*v, measured_ms);
        }
    }
}

/// The device-state save to predict with after a migration measured `measured_ms` (from
/// the guest's stop to the fence, as [`DEVICE_SAVE_MS`] was measured): a decaying average
/// of what this host measured, half weight to the newest. `previous` is 0 before any. One
/// figure for the host, whatever the VM: a VM with many more devices than the last ones
/// saves for longer than predicted until its own switchover is learned. Pure.
pub fn learn_device_save(previous: f64, measured_ms: f64) -> f64 {
    // A save out of this range is a stall or a bad clock, not the host's speed.
    let m = measured_ms.clamp(1.0, 1000.0);
    if previous > 0.0 {
        0.5 * previous + 0.5 * m
    } else {
        m
    }
}

/// The pause's tail as the last switchovers to each target measured it: from Commit sent
/// to the target's resume (the last pages and the device state arriving, the target's load
/// and resume, half a round trip). On a busy host the handshake's RTT, which the model
/// would halve, read 21-44 ms on a 20 ms path; replayed on the recorded wan sets the learned
/// tail put 34 of 39 pauses within 20% where the model put 26 (benches/RESULTS.md, twelfth
/// session). Same decaying average as the save ([`learn_device_save`]).
#[derive(Debug, Default)]
pub struct CommitTailHistory(std::sync::Mutex<std::collections::HashMap<String, f64>>);

impl CommitTailHistory {
    /// What to predict with for `target` (0: nothing measured yet).
    pub fn get(&self, target: &str) -> f64 {
        self.0
            .lock()
            .map(|m| m.get(target).copied().unwrap_or(0.0))
            .unwrap_or(0.0)
    }

    /// Takes in one switchover's measured tail to `target`.
    pub fn record(&self, target: &str, measured_ms: f64) {
        if let Ok(mut m) = self.0.lock() {
            let v = m.entry(target.to_string()).or_insert(0.0);
            *v = learn_device_save(*v, measured_ms);
        }
    }
}

/// The pause's own steps around the save: the last collection before the final round
/// leaves, and the commit (journaled) leaving after the fence.
pub const SWITCH_STEPS_MS: f64 = 2.0;

/// The target resuming once Commit arrived: its journal writes and `cont` (1.2-2 ms here).
pub const RESUME_MS: f64 = 2.0;

/// The target loading the device state once the last page is written (it may not
/// before: loading reads guest RAM): 2-5 ms under TCG here.
pub const TARGET_LOAD_MS: f64 = 3.0;

/// What a packet lost in the final round costs the pause, in round trips: 1.125 when a
/// later packet's acknowledgement reveals it (QUIC's time threshold), about two when it was
/// among the last (the probe timeout: smoothed RTT, four deviations and the peer's ACK
/// delay). Fitted on the far sets of the seventh to eleventh sessions (65 pauses at 0.1%
/// loss, 50 ms): 1.0 left the median pause 15 ms under what happened, 1.5 leaves it 5 ms
/// under (benches/RESULTS.md, twelfth session). The pause either pays a recovery or
/// does not: the prediction is its expectation, within 20% of about half those pauses.
pub const TAIL_RECOVERY_RTTS: f64 = 1.5;

/// Payload of a full QUIC packet on these links, bytes.
const QUIC_PACKET_BYTES: f64 = 1200.0;

/// Round 0's wire rate for the prediction: from the mark taken once the connection had
/// started up (`ramped`: wire bytes and seconds into the round) to the round's end, when
/// that span is long and full enough to say something; the whole round's average
/// otherwise. Pure.
pub fn round0_rate(wire_end: u64, secs: f64, ramped: Option<(u64, f64)>) -> f64 {
    let whole = wire_end as f64 / secs.max(1e-6);
    match ramped {
        Some((wire_mark, t_mark))
            if secs - t_mark >= 1.0 && wire_end.saturating_sub(wire_mark) >= 4 << 20 =>
        {
            // Never below the whole round's average: the ramp only ever slows the start.
            ((wire_end - wire_mark) as f64 / (secs - t_mark)).max(whole)
        }
        _ => whole,
    }
}

/// Pre-copy as a geometric series: each round sends what the guest wrote during the
/// previous one. Rounds are pipelined: a round lasts its transfer, or a round trip when
/// that is longer, plus on a lossy path a lost packet's recovery. (Up to eight rounds are
/// in flight, so short rounds end sooner than a round trip; but a switchover first drains
/// what they left queued, `StallDecision::Drain`, and the guest's short-window write rate
/// runs above the measured one: the round trip stays the floor, which the benchmark sets
/// measured within 20%.) Only round 0 waits for its own confirmation
/// (`first_confirmed`: the first round counted is round 0, before anything moved; after
/// round 0 the first round counted is round 1). Pure function of the measurements.
/// `pause_scan_bytes` is the RAM the source hashes in the pause (all of it with `--verify
/// full`, none by default).
///
/// The pause: the final round travels while QEMU saves its device state and the source is
/// fenced (whichever takes longer), plus on a lossy path the expected cost of a packet
/// of it lost ([`TAIL_RECOVERY_RTTS`]); then half a round trip (the last pages, the device
/// state's end and Commit crossing), the target's load of the device state — it needs the
/// last pages and the state's end, both of which cross after that — and its resume.
/// (The load sat inside the first step's maximum until the eighth session's sets showed the
/// target 16-20 ms from the commit's sending to its own commit on a 21 ms wan path, median
/// 7.8 ms beyond the half round trip, where the model had 2.)
pub fn predict(
    p: &mut pb::Prediction,
    ram_bytes: u64,
    streams: u32,
    downtime_ms: u32,
    max_rounds: u32,
    pause_scan_bytes: u64,
    first_confirmed: bool,
) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(streams.max(1) as usize) as f64;
    let link_pages = p.link_bytes_per_sec * p.codec_ratio.max(1.0);
    let cpu_pages = if p.codec_bytes_per_sec.is_finite() {
        p.codec_bytes_per_sec * cores
    } else {
        f64::INFINITY
    };
    let rate = link_pages.min(cpu_pages).max(1.0); // guest bytes per second moved
    let dirty = p.dirty_pages_per_sec * PAGE_SIZE as f64;
    let rtt_s = p.rtt_ms.max(0.0) / 1000.0;
    let loss = p.loss_rate.clamp(0.0, 1.0);
    let link = p.link_bytes_per_sec;
    // A packet of a round lost costs about one more round trip to recover.
    let recovery_s = |transfer_s: f64| {
        let packets = transfer_s * link / QUIC_PACKET_BYTES;
        (1.0 - (1.0 - loss).powf(packets)) * rtt_s
    };
    let round_trip_s = |transfer_s: f64| transfer_s + rtt_s + recovery_s(transfer_s);
    let pipelined_s = |transfer_s: f64| transfer_s.max(rtt_s) + recovery_s(transfer_s);
    // A round never has more to send than the whole guest.
    let max_round_s = ram_bytes as f64 / rate;
    let next_round_s = |round_s: f64| (dirty * pipelined_s(round_s) / rate).min(max_round_s);
    // The first round also pays the connection's start-up.
    let mut round_s = p.first_round_bytes as f64 / rate;
    let first_s = if first_confirmed {
        round_trip_s(round_s)
    } else {
        pipelined_s(round_s)
    };
    let mut total_s = first_s + p.link_ramp_ms / 1000.0;
    let mut rounds = 1;
    let target_s = f64::from(downtime_ms) / 1000.0;
    p.converges = dirty < rate * 0.9;
    loop {
        let next_s = next_round_s(round_s);
        // As `ferry_handoff::stall_decision` decides: transfer and round trip within the
        // target at once (but a big final round gets one more round when that halves
        // it); transfer alone once two rounds in a row stop shrinking (by a tenth): an
        // even series that is flat is flat from its first round, so from the third.
        let fits = next_s + rtt_s <= target_s
            && !ferry_handoff::worth_another_round(
                next_s * 1000.0,
                pipelined_s(round_s) * 1000.0,
                target_s * 1000.0,
            );
        let flat = rounds >= 3 && next_s >= 0.9 * round_s;
        if fits || flat || rounds >= max_rounds.max(1) {
            round_s = next_s;
            if flat && !fits && p.converges {
                // Rounds that stop shrinking sit near the series' floor, where what the
                // guest writes during a round (its round trip included) is the round.
                for _ in 0..50 {
                    round_s = next_round_s(round_s);
                }
            }
            break;
        }
        round_s = next_s;
        total_s += pipelined_s(round_s);
        rounds += 1;
    }
    p.predicted_rounds = rounds + 1;
    if p.device_save_ms <= 0.0 {
        p.device_save_ms = DEVICE_SAVE_MS;
    }
    // A packet of the final flight lost stalls the stream the target waits on; at its
    // tail nothing later is acknowledged and the probe timeout finds it.
    let tail_recovery_s = recovery_s(round_s) * TAIL_RECOVERY_RTTS;
    // From Commit sent to the resume: as measured to this target when known, on a
    // lossless path (a measured tail on a lossy one holds recoveries the loss term counts).
    let commit_tail_ms = if p.commit_tail_ms > 0.0 && loss == 0.0 {
        p.commit_tail_ms
    } else {
        rtt_s * 1000.0 / 2.0 + TARGET_LOAD_MS + RESUME_MS
    };
    let final_ms = SWITCH_STEPS_MS
        + p.device_save_ms.max(round_s * 1000.0)
        + tail_recovery_s * 1000.0
        + pause_scan_bytes as f64 / 6e9 * 1000.0
        + commit_tail_ms;
    p.predicted_downtime_ms = final_ms as u64;
    p.predicted_total_ms = if p.converges {
        (total_s * 1000.0 + final_ms) as u64
    } else {
        0
    };
}

/// Certificates expiring within this many days are reported.
pub const CERT_WARN_DAYS: i64 = 14;

/// The certificates of both hosts, `(host, identity, not after)`: expired (or with no
/// usable identity) fails, expiring within [`CERT_WARN_DAYS`] warns. Pure.
pub fn certificate_check(
    source: (&str, &str, i64),
    target: (&str, &str, i64),
    now_unix: i64,
) -> pb::PreflightCheck {
    let mut fails = Vec::new();
    let mut warns = Vec::new();
    let mut fine = Vec::new();
    for (host, identity, not_after) in [source, target] {
        let days = (not_after - now_unix) / 86400;
        if not_after == 0 {
            fails.push(format!("{host}: certificate expiry unknown ({identity})"));
        } else if not_after <= now_unix {
            fails.push(format!("{host}: certificate of {identity} has expired"));
        } else if days < CERT_WARN_DAYS {
            warns.push(format!(
                "{host}: certificate of {identity} expires in {days} day(s)"
            ));
        } else {
            fine.push(format!("{host}: {identity}, {days} days left"));
        }
    }
    let fix =
        "issue new certificates from the mesh CA (ferryctl certs init) and restart the agents";
    if !fails.is_empty() {
        check("certificates", Fail, fails.join("; "), fix, false)
    } else if !warns.is_empty() {
        check("certificates", Warn, warns.join("; "), fix, true)
    } else {
        check("certificates", Pass, fine.join("; "), "", false)
    }
}

/// How much a preflight measures besides its checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// The checks (CPU, name, machine, memory, storage, certificates, QEMU): one round
    /// trip to the target. What a migration runs: the link, the guest's write rate and
    /// the codec are measured by round 0 itself, and the convergence decision is made
    /// during pre-copy, so nothing delays the first page.
    Checks,
    /// Also probes the data path (~1 s) and samples the write rate and the codec, for
    /// a prediction before anything moves (`ferryctl preflight`).
    Measure,
}

/// Runs the preflight for a VM and a target.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &AgentCtx,
    spec: &VmSpec,
    proc: Option<&QemuProcess>,
    target: &str,
    codec: Codec,
    downtime_ms: u32,
    bandwidth_cap: u64,
    depth: Depth,
) -> Result<pb::PreflightReport, tonic::Status> {
    let chan = ctx.peers.get(target, &ctx.identity).await.map_err(|e| {
        tonic::Status::unavailable(format!(
            "cannot reach target agent {target} from {}: {e}",
            ctx.cfg.host_name
        ))
    })?;
    let facts = FerryPeerClient::new(chan.clone())
        .host_facts(pb::HostFactsRequest {})
        .await
        .map_err(|s| {
            ctx.peers.forget_if_unreached(target, &s);
            tonic::Status::unavailable(format!(
                "target {target} did not report its facts: {}",
                s.message()
            ))
        })?
        .into_inner();
    // An address that reaches this very agent (a loopback address given for a remote
    // host, a second name of this one): the name its certificate and facts carry tells.
    if facts.host_name == ctx.cfg.host_name {
        return Err(tonic::Status::invalid_argument(format!(
            "target {target} is this host ({}): give an address of another agent that {} can reach",
            ctx.cfg.host_name, ctx.cfg.host_name
        )));
    }
    let (vendor, _) = cpuinfo();
    let vendor = ctx.cfg.preflight.cpu_vendor.clone().unwrap_or(vendor);
    let guest_features = match proc {
        Some(p) => guest_cpu_features(p, &spec.cpu_model).await.ok(),
        None => None,
    };
    let mut checks = compare(
        spec,
        guest_features.as_ref(),
        &vendor,
        spec.accel.as_deref().unwrap_or(&ctx.cfg.accel),
        &facts,
    );

    // Certificates: both ends' expiry, and that the target is an agent.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let own = ctx
        .identity
        .peer_identity()
        .map(|i| (format!("{} {}", i.role, i.name), i.not_after_unix))
        .unwrap_or_else(|e| (e.to_string(), 0));
    checks.push(certificate_check(
        (&ctx.cfg.host_name, &own.0, own.1),
        (
            &facts.host_name,
            &facts.cert_identity,
            facts.cert_not_after_unix,
        ),
        now,
    ));

    // QEMU versions: same major.minor is the tested case; others work with a pinned type.
    let major_minor = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
    checks.push(
        if major_minor(&facts.qemu_version) == major_minor(&ctx.qemu_version) {
            check(
                "qemu",
                Pass,
                format!(
                    "QEMU {} here, {} on {}",
                    ctx.qemu_version, facts.qemu_version, facts.host_name
                ),
                "",
                false,
            )
        } else {
            check(
                "qemu",
                Warn,
                format!(
                    "QEMU {} here, {} on {}: works only with a machine type both have",
                    ctx.qemu_version, facts.qemu_version, facts.host_name
                ),
                "",
                true,
            )
        },
    );

    // Disks: shared storage (token file), or room and a place for copies on the target.
    if !spec.disks.is_empty() {
        let mut peer = FerryPeerClient::new(chan);
        checks.push(match crate::migration::disks::plan(&ctx.storage, spec, &mut peer, crate::migration::disks::StorageMode::Auto).await {
            Ok(plans) => {
                let parts: Vec<String> = plans
                    .iter()
                    .map(|p| {
                        if p.shared {
                            format!("{}: shared storage, stays put", p.probe.id)
                        } else {
                            format!("{}: copied ({} MiB allocated)", p.probe.id, p.probe.allocated_bytes >> 20)
                        }
                    })
                    .collect();
                check("storage", Pass, parts.join("; "), "", false)
            }
            Err(e) => check("storage", Fail, e, "put the images under the target's storage_roots with room to spare, or share the storage", false),
        });
    }

    let mut prediction = pb::Prediction::default();
    if depth == Depth::Checks {
        return Ok(report(checks, prediction, facts));
    }
    // The data path, as the migration will use it, probed while the guest's write rate is
    // sampled (that is mostly waiting): the two together take ~1 s instead of ~2 s.
    let quic_addr = facts.quic_addr.parse::<SocketAddr>().ok();
    let probe_fut = async {
        match quic_addr {
            Some(addr) => Some(probe(ctx, addr, bandwidth_cap).await),
            None => None,
        }
    };
    let rates_fut = async {
        match proc {
            Some(p) => Some(tokio::join!(dirty_rate(ctx, spec, p), qemu_dirty_rate(p))),
            None => None,
        }
    };
    let (probed, rates) = tokio::join!(probe_fut, rates_fut);
    match quic_addr.zip(probed) {
        Some((addr, probed)) => match probed {
            Ok((bw, rtt, ramp_ms, loss)) => {
                prediction.link_bytes_per_sec = bw;
                prediction.rtt_ms = rtt;
                prediction.loss_rate = loss;
                prediction.link_ramp_ms = ramp_ms;
                checks.push(check(
                    "reachability",
                    Pass,
                    format!("QUIC to {} ({addr}): {:.0} Mbit/s, RTT {:.1} ms", facts.host_name, bw * 8.0 / 1e6, rtt),
                    "",
                    false,
                ));
            }
            Err(e) => checks.push(check(
                "reachability",
                Fail,
                format!("the data path to {} ({addr}) failed: {e}", facts.host_name),
                "open UDP to the target's quic_listen port and check both certificates come from the mesh CA",
                false,
            )),
        },
        None => checks.push(check("reachability", Fail, format!("no QUIC address for {target}"), "", false)),
    }

    // Convergence: needs the guest running.
    if let Some((ours, qemu)) = rates {
        let ram = RamFile::open(ctx.cfg.ram_path(&spec.name), false)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let sample = tokio::task::spawn_blocking(move || codec_sample(&ram, codec));
        match (ours, sample.await) {
            (Ok(d), Ok(Ok((ratio, speed, first)))) => {
                prediction.dirty_pages_per_sec = d;
                prediction.qemu_dirty_mib_per_sec = qemu;
                prediction.codec_ratio = ratio;
                prediction.codec_bytes_per_sec = if speed.is_finite() { speed } else { 0.0 };
                prediction.first_round_bytes = first;
                let mut p2 = prediction;
                p2.codec_bytes_per_sec = speed;
                p2.device_save_ms = ctx.device_save.get();
                p2.commit_tail_ms = ctx.commit_tail.get(target);
                predict(
                    &mut p2,
                    spec.memory_mib << 20,
                    ctx.cfg.migration.page_streams(),
                    downtime_ms,
                    ctx.cfg.migration.max_rounds,
                    // The default verification hashes no more than it sends.
                    0,
                    true,
                );
                prediction.converges = p2.converges;
                prediction.predicted_total_ms = p2.predicted_total_ms;
                prediction.predicted_downtime_ms = p2.predicted_downtime_ms;
                prediction.predicted_rounds = p2.predicted_rounds;
                prediction.device_save_ms = p2.device_save_ms;
                prediction.commit_tail_ms = p2.commit_tail_ms;
                let mib = |b: f64| b / f64::from(1u32 << 20);
                let detail = format!(
                    "guest writes {:.1} MiB/s (QEMU estimate {:.1}); {codec} {:.2}x; link {:.0} MiB/s; predicted {} ms total, {} ms downtime, {} rounds",
                    mib(d * PAGE_SIZE as f64),
                    qemu,
                    ratio,
                    mib(prediction.link_bytes_per_sec),
                    prediction.predicted_total_ms,
                    prediction.predicted_downtime_ms,
                    prediction.predicted_rounds
                );
                checks.push(if prediction.converges {
                    check("convergence", Pass, detail, "", true)
                } else {
                    check(
                        "convergence",
                        Fail,
                        format!("will not converge: {detail}"),
                        "raise --bandwidth, use a faster codec (a stronger one if the link is the limit), or choose --on-stall throttle|pause",
                        true,
                    )
                });
            }
            (Err(e), _) => checks.push(check(
                "convergence",
                Warn,
                format!("dirty rate not measured: {e}"),
                "",
                true,
            )),
            (_, Err(e)) => checks.push(check(
                "convergence",
                Warn,
                format!("codec sample failed: {e}"),
                "",
                true,
            )),
            (_, Ok(Err(e))) => checks.push(check(
                "convergence",
                Warn,
                format!("codec sample failed: {e}"),
                "",
                true,
            )),
        }
    }
    Ok(report(checks, prediction, facts))
}

/// The report of `checks`: ok if none failed, ok with force if only soft ones did.
fn report(
    checks: Vec<pb::PreflightCheck>,
    prediction: pb::Prediction,
    facts: pb::HostFacts,
) -> pb::PreflightReport {
    let failed = |c: &pb::PreflightCheck| c.status == Fail as i32;
    let ok = !checks.iter().any(failed);
    let ok_with_force = !checks.iter().any(|c| failed(c) && !c.soft);
    pb::PreflightReport {
        checks,
        prediction: Some(prediction),
        ok,
        ok_with_force,
        target: Some(facts),
    }
}

/// What round 0 measured, for the prediction pre-copy makes after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round0 {
    /// Wire bytes per second round 0 moved (the link, or the compressor if slower).
    pub wire_bytes_per_sec: f64,
    /// The path's RTT without load: QUIC's least sample (the handshake's when none).
    pub rtt_ms: f64,
    /// Share of the packets round 0 sent that were lost.
    pub loss_rate: f64,
    /// Pages the guest wrote per second during round 0.
    pub dirty_pages_per_sec: f64,
    /// Guest bytes per wire byte the next rounds should see: measured on a sample of the
    /// pages written during round 0 (round 0's own ratio when there is none).
    pub codec_ratio: f64,
    /// What round 1 has to send (the pages written during round 0), bytes.
    pub next_round_bytes: u64,
    /// How long round 0 took.
    pub elapsed_ms: f64,
    /// The device-state save this host last measured (0: none yet, the default applies).
    pub device_save_ms: f64,
    /// The pause's tail to this target as last measured ([`CommitTailHistory`]; 0: none).
    pub commit_tail_ms: f64,
}

/// The prediction after round 0: the rest of the pre-copy from what round 0 measured (a
/// warm connection, no ramp; the codec's speed is inside the measured rate), with the
/// total counted from the migration's start. Pure.
pub fn predict_after_round0(
    r: Round0,
    ram_bytes: u64,
    streams: u32,
    downtime_ms: u32,
    max_rounds: u32,
    pause_scan_bytes: u64,
) -> pb::Prediction {
    let mut p = pb::Prediction {
        link_bytes_per_sec: r.wire_bytes_per_sec,
        rtt_ms: r.rtt_ms,
        loss_rate: r.loss_rate,
        dirty_pages_per_sec: r.dirty_pages_per_sec,
        codec_ratio: r.codec_ratio,
        codec_bytes_per_sec: f64::INFINITY,
        first_round_bytes: r.next_round_bytes,
        link_ramp_ms: 0.0,
        device_save_ms: r.device_save_ms,
        commit_tail_ms: r.commit_tail_ms,
        ..Default::default()
    };
    predict(
        &mut p,
        ram_bytes,
        streams,
        downtime_ms,
        max_rounds.saturating_sub(1),
        pause_scan_bytes,
        false,
    );
    if p.converges {
        p.predicted_total_ms += r.elapsed_ms as u64;
    }
    // Round 0 is part of the count.
    p.predicted_rounds += 1;
    p.codec_bytes_per_sec = 0.0;
    p
}

/// Why a pre-copy measured by round 0 will not converge, for the refusal (soft: `--force`
/// goes on and the stall policy decides). `None` when it converges.
pub fn round0_refusal(p: &pb::Prediction) -> Option<String> {
    if p.converges {
        return None;
    }
    let mib = |b: f64| b / f64::from(1u32 << 20);
    Some(format!(
        "will not converge: the guest writes {:.1} MiB/s and round 0 moved {:.1} MiB/s of pages \
         ({:.0} MiB/s on the wire, {:.2}x compression)",
        mib(p.dirty_pages_per_sec * PAGE_SIZE as f64),
        mib(p.link_bytes_per_sec * p.codec_ratio.max(1.0)),
        mib(p.link_bytes_per_sec),
        p.codec_ratio
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> pb::Prediction {
        pb::Prediction {
            link_bytes_per_sec: 100.0 * 1048576.0,
            rtt_ms: 20.0,
            dirty_pages_per_sec: 20.0 * 256.0, // 20 MiB/s
            codec_ratio: 2.0,
            codec_bytes_per_sec: f64::INFINITY,
            first_round_bytes: 200 << 20,
            link_ramp_ms: 300.0,
            ..Default::default()
        }
    }

    #[test]
    fn round0_prediction_counts_what_is_left() {
        let r = Round0 {
            wire_bytes_per_sec: 100.0 * 1048576.0,
            rtt_ms: 20.0,
            loss_rate: 0.0,
            dirty_pages_per_sec: 20.0 * 256.0,
            codec_ratio: 2.0,
            next_round_bytes: 20 << 20,
            elapsed_ms: 1000.0,
            device_save_ms: 0.0,
            commit_tail_ms: 0.0,
        };
        let p = predict_after_round0(r, 512 << 20, 4, 30, 30, 0);
        assert!(p.converges && round0_refusal(&p).is_none());
        // Round 1: 20 MiB at 200 MiB/s = 0.1 s (pipelined: the next round does not wait
        // for its confirmation); what the guest wrote meanwhile, 10 ms, fits the 30 ms
        // target with the 20 ms round trip: the final round. The pause: 2 ms of steps,
        // the device-state save (12 ms, longer than the final round's 10), half a round
        // trip, the target's load (3 ms) and 2 ms to resume. Total from the start:
        // 1000 + 100 + 29.
        assert!((1127..=1131).contains(&p.predicted_total_ms), "{p:?}");
        assert_eq!(p.predicted_rounds, 3, "rounds 0, 1, final: {p:?}");
        assert_eq!(p.predicted_downtime_ms, 29, "{p:?}");
        // A guest writing faster than round 0 moved pages is refused, with both rates.
        let busy = predict_after_round0(
            Round0 {
                dirty_pages_per_sec: 250.0 * 256.0,
                ..r
            },
            512 << 20,
            4,
            30,
            30,
            0,
        );
        let why = round0_refusal(&busy).expect("refused");
        assert!(
            why.contains("writes 250.0 MiB/s") && why.contains("moved 200.0 MiB/s"),
            "{why}"
        );
    }

    #[test]
    fn converging_series_is_summed() {
        let mut p = base();
        predict(&mut p, 512 << 20, 4, 30, 30, 512 << 20, true);
        assert!(p.converges);
        // Round 0: 200 MiB at 200 MiB/s of pages + its round trip (round 0 alone waits
        // for its confirmation) + 0.3 s start-up = 1.32 s; each round sends a tenth of
        // what the one before lasted: 0.1 s, then 10 ms, which fits the 30 ms target with
        // the 20 ms round trip. The pause: 2 ms + the 12 ms save (longer than the 10 ms
        // final round) + a fingerprint of 512 MiB (~90 ms) + half a round trip + the
        // target's load (3 ms) + 2 ms.
        assert!((1534..=1542).contains(&p.predicted_total_ms), "{p:?}");
        assert_eq!(p.predicted_rounds, 3);
        assert!((116..=120).contains(&p.predicted_downtime_ms), "{p:?}");
    }

    #[test]
    fn a_long_path_ends_at_the_series_floor_and_losses_lengthen_it() {
        // 50 ms round trip: no final round fits 30 ms with it, so rounds go on until they
        // stop shrinking. The guest writes half as fast as pages move: a pipelined round
        // lasts its transfer or the round trip, whichever is longer, the next one sends
        // what was written meanwhile: t = max(t, 50 ms) / 2 at the floor: 25 ms.
        let far = || {
            let mut p = base();
            p.rtt_ms = 50.0;
            p.dirty_pages_per_sec = 100.0 * 256.0; // 100 MiB/s against 200 MiB/s of pages
            p
        };
        let mut clean = far();
        predict(&mut clean, 512 << 20, 4, 30, 30, 0, true);
        assert!(clean.converges);
        // The pause: 2 ms + the final round (25 ms, longer than the save) + 25 ms + the
        // target's load (3 ms) + 2 ms.
        assert!(
            (55..=59).contains(&clean.predicted_downtime_ms),
            "{clean:?}"
        );
        // 1% loss: every round of thousands of packets loses one and takes a round trip
        // more to recover: rounds last max(t, 50 ms) + 50 ms, the floor is 50 ms, and the
        // final round's own recovery adds 1.5 round trips (75 ms) to the pause.
        let mut lossy = far();
        lossy.loss_rate = 0.01;
        predict(&mut lossy, 512 << 20, 4, 30, 30, 0, true);
        assert!(
            (153..=161).contains(&lossy.predicted_downtime_ms),
            "{lossy:?}"
        );
        assert!(lossy.predicted_total_ms > clean.predicted_total_ms);
        // A recovery costs a round trip, however many packets are lost.
        let mut awful = far();
        awful.loss_rate = 0.5;
        predict(&mut awful, 512 << 20, 4, 30, 30, 0, true);
        assert_eq!(awful.predicted_downtime_ms, lossy.predicted_downtime_ms);
    }

    #[test]
    fn a_short_path_takes_one_more_round_for_a_big_final_one() {
        // lan: 0.5 ms round trip, 380 MB/s raw, the guest writing 50 MiB/s. Round 0 (64 MB)
        // lasts 168 ms; what it leaves, 23 ms, would fit the 30 ms target with its round
        // trip as the final round, but is over a third of it: sent as round 1, it leaves
        // 3.2 ms for the final round. The pause: 2 ms + the 12 ms save (longer than
        // 3.2) + 0.25 + the target's load (3 ms) + 2 ms (30 ms with the final round of
        // 23 ms).
        let mut p = pb::Prediction {
            link_bytes_per_sec: 380e6,
            rtt_ms: 0.5,
            dirty_pages_per_sec: 50.0 * 256.0,
            codec_ratio: 1.0,
            codec_bytes_per_sec: f64::INFINITY,
            first_round_bytes: 64_000_000,
            ..Default::default()
        };
        predict(&mut p, 1 << 30, 4, 30, 30, 0, false);
        assert_eq!(p.predicted_rounds, 3, "rounds 0, 1, final: {p:?}");
        assert_eq!(p.predicted_downtime_ms, 19, "{p:?}");
    }

    #[test]
    fn round0_rate_leaves_out_the_start_up() {
        const MIB: u64 = 1 << 20;
        // 10 s round: 10 MiB in the first 0.5 s, then 100 MiB/s: the rate after the mark.
        let r = round0_rate(960 * MIB, 10.0, Some((10 * MIB, 0.5)));
        assert!((r / MIB as f64 - 100.0).abs() < 0.01, "{r}");
        // A short round after the mark says nothing of its own: the whole average.
        let r = round0_rate(60 * MIB, 1.2, Some((10 * MIB, 0.5)));
        assert!((r / MIB as f64 - 50.0).abs() < 0.01, "{r}");
        // Never below the whole average (a stall after the mark is not the link's rate).
        let r = round0_rate(400 * MIB, 4.0, Some((300 * MIB, 0.5)));
        assert!((r / MIB as f64 - 100.0).abs() < 0.01, "{r}");
        assert_eq!(round0_rate(100 * MIB, 1.0, None), 100.0 * MIB as f64);
    }

    #[test]
    fn dirtying_faster_than_the_link_does_not_converge() {
        let mut p = base();
        p.dirty_pages_per_sec = 300.0 * 256.0; // 300 MiB/s against 200 MiB/s of pages
        predict(&mut p, 512 << 20, 4, 30, 30, 512 << 20, true);
        assert!(!p.converges);
        assert_eq!(p.predicted_total_ms, 0);
        // A round never carries more than the whole guest: 512 MiB at 200 MiB/s.
        assert!(p.predicted_downtime_ms <= 2560 + 200, "{p:?}");
    }

    #[test]
    fn slow_codec_is_the_limit() {
        let mut p = base();
        p.codec_bytes_per_sec = 10.0 * 1048576.0; // 10 MiB/s per core: slower than the guest writes
        predict(&mut p, 512 << 20, 4, 30, 30, 512 << 20, true);
        assert!(!p.converges, "{p:?}");
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = own_cpu_seconds();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = own_cpu_seconds();
        assert!(after - before >= 0.1, "{before} -> {after}");
    }

    #[test]
    fn qemu_feature_names_map_to_cpuinfo() {
        assert_eq!(normalize_feature("sse4.2"), "sse4_2");
        assert_eq!(normalize_feature("lahf-lm"), "lahf_lm");
        assert_eq!(normalize_feature("sse3"), "pni");
        assert_eq!(normalize_feature("xd"), "nx");
        assert_eq!(normalize_feature("i64"), "lm");
    }
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn memory_admission_keeps_the_reserve_and_fits_the_ram_dir() {
        assert!(memory_admission(1024 * MIB, 4096 * MIB, 0, 512 * MIB, 0).is_ok());
        let e = memory_admission(4000 * MIB, 4096 * MIB, 0, 512 * MIB, 0).expect_err("reserve");
        assert!(e.contains("memory_reserve_mib"), "{e}");
        let e = memory_admission(1024 * MIB, 8192 * MIB, 512 * MIB, 0, 0).expect_err("ram dir");
        assert!(e.contains("RAM directory: 512 MiB free"), "{e}");
    }

    #[test]
    fn memory_admission_counts_what_the_guests_already_there_may_still_take() {
        // Two sparse guests of 2 GiB holding 512 MiB each: 3 GiB promised.
        let promised = ram_promised([(2048 * MIB, 512 * MIB), (2048 * MIB, 512 * MIB)]);
        assert_eq!(promised, 3072 * MIB);
        // A preallocated guest (its file holds all of it) promises nothing more.
        assert_eq!(ram_promised([(1024 * MIB, 1024 * MIB)]), 0);
        // 4000 MiB free in the RAM directory hold a 1 GiB guest alone, not beside the 3 GiB.
        assert!(memory_admission(1024 * MIB, 64 << 30, 4000 * MIB, 0, 0).is_ok());
        let e =
            memory_admission(1024 * MIB, 64 << 30, 4000 * MIB, 0, promised).expect_err("promised");
        assert!(
            e.contains("beside the 3072 MiB the guests already there may still take"),
            "{e}"
        );
        assert!(
            memory_admission(1024 * MIB, 64 << 30, 4000 * MIB, 0, promised - 100 * MIB).is_ok()
        );
        // The same in memory.
        let e = memory_admission(1024 * MIB, 4000 * MIB, 0, 0, promised).expect_err("memory");
        assert!(
            e.contains("memory_reserve_mib") && e.contains("3072 MiB"),
            "{e}"
        );
    }

    #[test]
    fn certificates_expired_expiring_and_fine() {
        let now = 1_000_000_000;
        let day = 86400;
        let c = certificate_check(
            ("a", "agent a", now + 100 * day),
            ("b", "agent b", now + 90 * day),
            now,
        );
        assert_eq!(c.status, Pass as i32, "{c:?}");
        let c = certificate_check(
            ("a", "agent a", now + 100 * day),
            ("b", "agent b", now + 3 * day),
            now,
        );
        assert_eq!(c.status, Warn as i32, "{c:?}");
        assert!(
            c.detail
                .contains("b: certificate of agent b expires in 3 day(s)"),
            "{c:?}"
        );
        let c = certificate_check(
            ("a", "agent a", now - 1),
            ("b", "agent b", now + 90 * day),
            now,
        );
        assert_eq!(c.status, Fail as i32, "{c:?}");
        assert!(c.detail.contains("has expired"), "{c:?}");
        let c = certificate_check(("a", "agent a", now + 90 * day), ("b", "", 0), now);
        assert_eq!(
            c.status, Fail as i32,
            "an old agent that reports no expiry: {c:?}"
        );
    }

    #[test]
    fn the_device_save_is_learned_from_the_hosts_switchovers() {
        // The first measurement is taken as is; then the newest weighs half.
        assert_eq!(learn_device_save(0.0, 18.0), 18.0);
        assert_eq!(learn_device_save(18.0, 26.0), 22.0);
        // A stalled switchover does not teach a 10 s save.
        assert_eq!(learn_device_save(20.0, 10_000.0), 510.0);
        let h = DeviceSaveHistory::default();
        assert_eq!(h.get(), 0.0);
        h.record(16.0);
        h.record(20.0);
        assert_eq!(h.get(), 18.0);
    }

    #[test]
    fn the_pause_prediction_uses_the_learned_save() {
        let base = pb::Prediction {
            link_bytes_per_sec: 118e6,
            rtt_ms: 20.0,
            dirty_pages_per_sec: 12_800.0,
            codec_ratio: 1.8,
            codec_bytes_per_sec: f64::INFINITY,
            first_round_bytes: 8 << 20,
            ..Default::default()
        };
        let mut default = base;
        predict(&mut default, 1 << 30, 4, 30, 30, 0, true);
        assert_eq!(
            default.device_save_ms, DEVICE_SAVE_MS,
            "nothing learned: the default"
        );
        let mut learned = pb::Prediction {
            device_save_ms: 30.0,
            ..base
        };
        predict(&mut learned, 1 << 30, 4, 30, 30, 0, true);
        // The default save (12 ms) outlasts the final round (under 10 ms): 2 + 12 + 10 +
        // the target's load (3) + 2; a learned 30 ms save is the pause's core instead:
        // 2 + 30 + 10 + 3 + 2.
        assert_eq!(learned.predicted_downtime_ms, 47, "{learned:?}");
        assert_eq!(default.predicted_downtime_ms, 29, "{default:?}");
    }

    #[test]
    fn the_pause_tail_is_learned_per_target_and_used_on_lossless_paths() {
        let h = CommitTailHistory::default();
        assert_eq!(h.get("b:7701"), 0.0);
        h.record("b:7701", 14.0);
        h.record("b:7701", 18.0);
        h.record("c:7701", 40.0);
        assert_eq!(h.get("b:7701"), 16.0, "a decaying average, newest half");
        assert_eq!(h.get("c:7701"), 40.0, "one figure per target");
        // A handshake RTT read at 36 ms: the model's tail is 18 + 3 + 2 = 23 ms; a
        // measured 13 ms replaces it.
        let base = pb::Prediction {
            link_bytes_per_sec: 118e6,
            rtt_ms: 36.0,
            dirty_pages_per_sec: 12_800.0,
            codec_ratio: 1.8,
            codec_bytes_per_sec: f64::INFINITY,
            first_round_bytes: 8 << 20,
            device_save_ms: 12.0,
            ..Default::default()
        };
        let mut modelled = base;
        predict(&mut modelled, 1 << 30, 4, 30, 30, 0, false);
        let mut learned = pb::Prediction {
            commit_tail_ms: 13.0,
            ..base
        };
        predict(&mut learned, 1 << 30, 4, 30, 30, 0, false);
        assert_eq!(
            modelled.predicted_downtime_ms - learned.predicted_downtime_ms,
            10,
            "{modelled:?} {learned:?}"
        );
        // On a lossy path the measured tail held recoveries: the model and its loss term.
        let lossy = |tail| {
            let mut p = pb::Prediction {
                loss_rate: 0.001,
                commit_tail_ms: tail,
                ..base
            };
            predict(&mut p, 1 << 30, 4, 30, 30, 0, false);
            p.predicted_downtime_ms
        };
        assert_eq!(lossy(13.0), lossy(0.0));
    }
}
