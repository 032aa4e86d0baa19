//! `--json` output: the gRPC responses as JSON objects whose keys are the proto field names
//! and whose enums are their short names (`"RUNNING"`, `"PRECOPY"`). The prost types do not
//! derive serde, so the mapping is written out here.

use crate::report::{phase_name, vm_state_name};
use ferry_api::v1::{MigrationStats, MigrationStatus, VmInfo, VmSpec};
use serde_json::{json, Value};

/// A VM spec as JSON.
pub fn vm_spec(s: &VmSpec) -> Value {
    json!({
        "name": s.name,
        "vcpus": s.vcpus,
        "memory_mib": s.memory_mib,
        "memory_prealloc": s.memory_prealloc,
        "cpu_model": s.cpu_model,
        "machine": s.machine,
        "accel": s.accel,
        "kernel": s.kernel,
        "initrd": s.initrd,
        "cmdline": s.cmdline,
        "disks": s.disks.iter().map(|d| json!({
            "id": d.id, "path": d.path, "format": d.format, "read_only": d.read_only,
        })).collect::<Vec<_>>(),
        "nics": s.nics.iter().map(|n| json!({
            "id": n.id, "mac": n.mac, "bridge": n.bridge,
        })).collect::<Vec<_>>(),
    })
}

/// A `VmInfo` as JSON.
pub fn vm_info(vm: &VmInfo) -> Value {
    json!({
        "spec": vm.spec.as_ref().map(vm_spec),
        "state": vm_state_name(vm.state()),
        "pid": vm.pid,
        "qmp_socket": vm.qmp_socket,
        "console_socket": vm.console_socket,
        "console_log": vm.console_log,
        "ram_file": vm.ram_file,
        "resume_latency_us": vm.resume_latency_us,
        "fenced": vm.fenced,
    })
}

/// A list of VMs as `{"vms": [...]}` (the shape of `ListVmsResponse`).
pub fn vm_list(vms: &[VmInfo]) -> Value {
    json!({ "vms": vms.iter().map(vm_info).collect::<Vec<_>>() })
}

/// Migration statistics as JSON.
pub fn migration_stats(s: &MigrationStats) -> Value {
    json!({
        "guest_ram_bytes": s.guest_ram_bytes,
        "pages_sent": s.pages_sent,
        "zero_pages_sent": s.zero_pages_sent,
        "pages_resent": s.pages_resent,
        "pages_skipped": s.pages_skipped,
        "page_bytes": s.page_bytes,
        "wire_bytes": s.wire_bytes,
        "device_state_bytes": s.device_state_bytes,
        "rounds": s.rounds,
        "last_round_dirty_pages": s.last_round_dirty_pages,
        "dirty_rate_pages_per_sec": finite(s.dirty_rate_pages_per_sec),
        "throughput_bytes_per_sec": finite(s.throughput_bytes_per_sec),
        "compression_ratio": finite(s.compression_ratio),
        "elapsed_ms": s.elapsed_ms,
        "preflight_ms": s.preflight_ms,
        "storage": s.storage,
        "disk_bytes_total": s.disk_bytes_total,
        "disk_bytes_done": s.disk_bytes_done,
        "disk_wire_bytes": s.disk_wire_bytes,
        "disk_bytes_skipped": s.disk_bytes_skipped,
        "disk_bytes_resumed": s.disk_bytes_resumed,
        "downtime_ms": s.downtime_ms,
        "expected_downtime_ms": s.expected_downtime_ms,
        "codec": s.codec,
        "tracker": s.tracker,
        "verify": s.verify,
        "audited_pages": s.audited_pages,
        "round_pages": s.round_pages,
        "round_pages_done": s.round_pages_done,
        "eta_ms": s.eta_ms,
        "round_history": s.round_history.iter().map(|r| json!({
            "round": r.round,
            "pages": r.pages,
            "wire_bytes": r.wire_bytes,
            "duration_ms": r.duration_ms,
            "dirty_pages": r.dirty_pages,
            "final": r.r#final,
        })).collect::<Vec<_>>(),
        "ram_digest": s.ram_digest,
        "policy_applied": s.policy_applied,
        "downtime_breakdown": s.downtime_breakdown.as_ref().map(|b| json!({
            "pre_switchover_us": b.pre_switchover_us,
            "final_round_us": b.final_round_us,
            "device_state_us": b.device_state_us,
            "verify_us": b.verify_us,
            "commit_us": b.commit_us,
            "fence_us": b.fence_us,
            "commit_sent_us": b.commit_sent_us,
            "continue_us": b.continue_us,
        })),
        "prediction": s.prediction.as_ref().map(|p| json!({
            "link_bytes_per_sec": finite(p.link_bytes_per_sec),
            "rtt_ms": finite(p.rtt_ms),
            "dirty_pages_per_sec": finite(p.dirty_pages_per_sec),
            "qemu_dirty_mib_per_sec": finite(p.qemu_dirty_mib_per_sec),
            "codec_ratio": finite(p.codec_ratio),
            "codec_bytes_per_sec": finite(p.codec_bytes_per_sec),
            "first_round_bytes": p.first_round_bytes,
            "converges": p.converges,
            "predicted_total_ms": p.predicted_total_ms,
            "predicted_downtime_ms": p.predicted_downtime_ms,
            "predicted_rounds": p.predicted_rounds,
            "link_ramp_ms": finite(p.link_ramp_ms),
            "loss_rate": finite(p.loss_rate),
            "device_save_ms": finite(p.device_save_ms),
            "commit_tail_ms": finite(p.commit_tail_ms),
        })),
    })
}

/// A `MigrationStatus` as JSON.
pub fn migration_status(m: &MigrationStatus) -> Value {
    json!({
        "id": m.id,
        "vm": m.vm,
        "source": m.source,
        "target": m.target,
        "phase": phase_name(m.phase()),
        "stats": m.stats.as_ref().map(migration_stats),
        "error": m.error,
        "message": m.message,
        "started_unix_ms": m.started_unix_ms,
        "finished_unix_ms": m.finished_unix_ms,
    })
}

/// A list of migrations as `{"migrations": [...]}` (the shape of `ListMigrationsResponse`).
pub fn migration_list(ms: &[MigrationStatus]) -> Value {
    json!({ "migrations": ms.iter().map(migration_status).collect::<Vec<_>>() })
}

/// JSON has no NaN or infinity: those become `null`.
fn finite(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}

/// A host's facts (`GetHostFacts`) as JSON.
pub fn host_facts(f: &ferry_api::v1::HostFacts) -> Value {
    json!({
        "host_name": f.host_name,
        "protocol_version": f.protocol_version,
        "qemu_version": f.qemu_version,
        "machine_types": f.machine_types,
        "accel": f.accel,
        "cpu_vendor": f.cpu_vendor,
        "cpu_features_source": f.cpu_features_source,
        "bridges": f.bridges,
        "mem_available_bytes": f.mem_available_bytes,
        "ram_dir_free_bytes": f.ram_dir_free_bytes,
        "ram_reserve_bytes": f.ram_reserve_bytes,
        "ram_promised_bytes": f.ram_promised_bytes,
        "vm_names": f.vm_names,
        "tracker": f.tracker,
        "quic_addr": f.quic_addr,
        "cert_identity": f.cert_identity,
        "cert_not_after_unix": f.cert_not_after_unix,
        "storage_roots": f.storage_roots,
    })
}

/// A preflight report as JSON.
pub fn preflight_report(r: &ferry_api::v1::PreflightReport) -> serde_json::Value {
    let checks: Vec<serde_json::Value> = r
        .checks
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "status": ferry_api::v1::CheckStatus::try_from(c.status).map(|s| s.as_str_name()).unwrap_or("?"),
                "detail": c.detail,
                "fix": c.fix,
                "soft": c.soft,
            })
        })
        .collect();
    let p = r.prediction.unwrap_or_default();
    serde_json::json!({
        "ok": r.ok,
        "ok_with_force": r.ok_with_force,
        "checks": checks,
        "prediction": {
            "link_bytes_per_sec": p.link_bytes_per_sec,
            "rtt_ms": p.rtt_ms,
            "dirty_pages_per_sec": p.dirty_pages_per_sec,
            "qemu_dirty_mib_per_sec": p.qemu_dirty_mib_per_sec,
            "codec_ratio": p.codec_ratio,
            "codec_bytes_per_sec": p.codec_bytes_per_sec,
            "first_round_bytes": p.first_round_bytes,
            "converges": p.converges,
            "predicted_total_ms": p.predicted_total_ms,
            "predicted_downtime_ms": p.predicted_downtime_ms,
            "predicted_rounds": p.predicted_rounds,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::v1::{MigrationPhase, VmState};

    #[test]
    fn enums_are_short_names_and_fields_are_proto_names() {
        let vm = VmInfo {
            spec: Some(VmSpec {
                name: "a".into(),
                memory_mib: 64,
                ..Default::default()
            }),
            state: VmState::Paused as i32,
            pid: 7,
            ..Default::default()
        };
        let v = vm_info(&vm);
        assert_eq!(v["state"], "PAUSED");
        assert_eq!(v["spec"]["memory_mib"], 64);
        assert_eq!(vm_list(&[vm])["vms"][0]["pid"], 7);

        let m = MigrationStatus {
            id: "x".into(),
            phase: MigrationPhase::InDoubt as i32,
            stats: Some(MigrationStats {
                compression_ratio: f64::NAN,
                rounds: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = migration_status(&m);
        assert_eq!(v["phase"], "IN_DOUBT");
        assert_eq!(v["stats"]["rounds"], 3);
        assert!(v["stats"]["compression_ratio"].is_null());
        assert!(serde_json::to_string(&v).is_ok());
        assert_eq!(migration_list(&[m])["migrations"][0]["id"], "x");
    }
}
