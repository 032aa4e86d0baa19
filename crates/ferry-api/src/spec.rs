//! Conversions between `ferry_qemu::VmSpec` and its gRPC form, shared by the agent and
//! the CLI so both speak the same defaults.

use crate::v1 as pb;
use ferry_qemu::{DiskBus, DiskFormat, DiskSpec, NicBackend, NicSpec, VmSpec};
use std::path::PathBuf;

/// A gRPC VM spec to a validated [`VmSpec`] (empty fields take their defaults).
pub fn from_pb(p: &pb::VmSpec) -> Result<VmSpec, String> {
    let mut s = VmSpec::new(p.name.clone(), p.memory_mib);
    s.memory_prealloc = p.memory_prealloc;
    if p.vcpus != 0 {
        s.vcpus = p.vcpus;
    }
    if !p.cpu_model.is_empty() {
        s.cpu_model = p.cpu_model.clone();
    }
    if !p.machine.is_empty() {
        s.machine = p.machine.clone();
    }
    s.accel = non_empty(&p.accel);
    s.kernel = non_empty(&p.kernel).map(PathBuf::from);
    s.initrd = non_empty(&p.initrd).map(PathBuf::from);
    s.cmdline = non_empty(&p.cmdline);
    for d in &p.disks {
        let format = match d.format.as_str() {
            "qcow2" | "" => DiskFormat::Qcow2,
            "raw" => DiskFormat::Raw,
            other => {
                return Err(format!(
                    "disks[{}].format: unknown format '{other}' (qcow2 or raw)",
                    d.id
                ))
            }
        };
        s.disks.push(DiskSpec {
            id: d.id.clone(),
            path: PathBuf::from(&d.path),
            format,
            bus: DiskBus::VirtioBlk,
            read_only: d.read_only,
        });
    }
    for n in &p.nics {
        let backend = if n.bridge.is_empty() {
            NicBackend::User
        } else {
            NicBackend::Bridge {
                name: n.bridge.clone(),
            }
        };
        s.nics.push(NicSpec {
            id: n.id.clone(),
            mac: non_empty(&n.mac),
            backend,
        });
    }
    s.validate().map_err(|e| format!("VM spec: {e}"))?;
    Ok(s)
}

/// A [`VmSpec`] to its gRPC form.
pub fn to_pb(s: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        name: s.name.clone(),
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        memory_prealloc: s.memory_prealloc,
        cpu_model: s.cpu_model.clone(),
        machine: s.machine.clone(),
        accel: s.accel.clone().unwrap_or_default(),
        kernel: path_str(&s.kernel),
        initrd: path_str(&s.initrd),
        cmdline: s.cmdline.clone().unwrap_or_default(),
        disks: s
            .disks
            .iter()
            .map(|d| pb::DiskSpec {
                id: d.id.clone(),
                path: d.path.display().to_string(),
                format: match d.format {
                    DiskFormat::Qcow2 => "qcow2".into(),
                    DiskFormat::Raw => "raw".into(),
                },
                read_only: d.read_only,
            })
            .collect(),
        nics: s
            .nics
            .iter()
            .map(|n| pb::NicSpec {
                id: n.id.clone(),
                mac: n.mac.clone().unwrap_or_default(),
                bridge: match &n.backend {
                    NicBackend::User => String::new(),
                    NicBackend::Bridge { name } => name.clone(),
                },
            })
            .collect(),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn path_str(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}
