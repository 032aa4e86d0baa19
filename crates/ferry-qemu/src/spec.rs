//! The VM specification and its validation.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default CPU model: plain and available under both TCG and KVM, so a VM
/// can move between hosts of different CPU generations.
pub const DEFAULT_CPU_MODEL: &str = "qemu64";

/// Default machine type. Pinned (not the moving `pc` alias) because QEMU
/// 7.2 and 10.0 can only migrate between each other when both run the same
/// versioned machine type.
pub const DEFAULT_MACHINE: &str = "pc-i440fx-7.2";

/// Smallest accepted guest memory, MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest accepted guest memory (1 TiB), MiB.
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
/// Largest accepted vCPU count.
pub const MAX_VCPUS: u32 = 256;

/// The accelerators a spec or host may ask for.
pub(crate) const ACCELS: &[&str] = &["kvm", "tcg"];

/// Longest disk id: QEMU node names are at most 31 bytes and we derive
/// `ID-file` from it.
const MAX_DISK_ID: usize = 31 - "-file".len();
/// Longest NIC id.
const MAX_NIC_ID: usize = 31;

/// What a VM is: everything that must be identical on the source and the
/// target of a migration. Host-specific settings live in
/// [`crate::QemuLaunch`].
///
/// In TOML:
/// ```toml
/// name = "web1"
/// memory_mib = 512
/// kernel = "/var/lib/ferry/vmlinuz"
/// cmdline = "console=ttyS0"
///
/// [[disks]]
/// id = "disk0"
/// path = "/var/lib/ferry/web1.qcow2"
/// format = "qcow2"
///
/// [[nics]]
/// id = "net0"
/// mac = "52:54:00:12:34:56"
/// backend = { type = "bridge", name = "br0" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// VM name: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
    pub name: String,
    /// Number of vCPUs, 1..=256.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest memory in MiB, 16..=1048576.
    pub memory_mib: u64,
    /// Allocate all of the guest's memory on the host before the guest runs: when the VM
    /// starts, and on a migration's target before the guest resumes there (libvirt's
    /// `<allocation mode="immediate">`). Without it (the default) the host gives the guest
    /// memory as it writes it, and a migrated guest holds on its target only the pages that
    /// arrived — but a host whose RAM directory fills up later kills a guest that touches a
    /// page it never had (SIGBUS), as with any sparse VM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_prealloc: bool,
    /// QEMU `-cpu` value: a model name, optionally followed by
    /// `,feature` flags (`qemu64,+ssse3`). Passed to QEMU verbatim.
    #[serde(default = "default_cpu_model")]
    pub cpu_model: String,
    /// QEMU machine type; keep it versioned (see [`DEFAULT_MACHINE`]).
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Accelerator (`kvm` or `tcg`) overriding the host's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Direct-boot kernel (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initrd for the direct-boot kernel (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Block devices, in guest order.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, in guest order.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

fn default_vcpus() -> u32 {
    1
}
fn default_cpu_model() -> String {
    DEFAULT_CPU_MODEL.to_owned()
}
fn default_machine() -> String {
    DEFAULT_MACHINE.to_owned()
}

/// A disk image attached to the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Identifier: `[A-Za-z][A-Za-z0-9_-]{0,25}`, unique among disks. Used
    /// as the QEMU block node name (`ID`, `ID-file`) and device id `vblk-ID`.
    pub id: String,
    /// Image path (absolute).
    pub path: PathBuf,
    /// Image format. Defaults to qcow2: opening a raw image as qcow2 fails
    /// loudly, while the opposite would hand the guest the qcow2 metadata.
    #[serde(default)]
    pub format: DiskFormat,
    /// How the disk is attached.
    #[serde(default)]
    pub bus: DiskBus,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Disk image format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// qcow2 image (QEMU driver `qcow2`).
    #[default]
    Qcow2,
    /// Raw image (QEMU driver `raw`).
    Raw,
}

impl DiskFormat {
    /// The QEMU block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Disk attachment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// `virtio-blk-pci`.
    #[default]
    VirtioBlk,
}

/// A network interface (always `virtio-net-pci`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// Identifier: `[A-Za-z][A-Za-z0-9_-]{0,30}`, unique among NICs. Used as
    /// the QEMU netdev id.
    pub id: String,
    /// MAC address `xx:xx:xx:xx:xx:xx` (unicast). Set it: a migrated guest
    /// must keep its MAC, and QEMU's automatic one depends on NIC order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Host side of the interface.
    #[serde(default)]
    pub backend: NicBackend,
}

/// Host side of a NIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NicBackend {
    /// QEMU user-mode networking (slirp): no host setup, no inbound traffic.
    #[default]
    User,
    /// A tap device on a host bridge, via `qemu-bridge-helper`.
    Bridge {
        /// Host bridge name, e.g. `br0`.
        name: String,
    },
}

/// A spec field that is not acceptable, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The offending field, e.g. `memory_mib` or `disks[1].id`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SpecError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl VmSpec {
    /// A spec with the given name and memory and every other field at its
    /// default (no kernel, disks or NICs yet: add a boot source).
    pub fn new(name: impl Into<String>, memory_mib: u64) -> Self {
        VmSpec {
            name: name.into(),
            vcpus: default_vcpus(),
            memory_mib,
            memory_prealloc: false,
            cpu_model: default_cpu_model(),
            machine: default_machine(),
            accel: None,
            kernel: None,
            initrd: None,
            cmdline: None,
            disks: Vec::new(),
            nics: Vec::new(),
        }
    }

    /// Checks every field; the error names the first bad field.
    ///
    /// Whatever passes here is safe to splice into QEMU's option syntax
    /// (together with the escaping in [`crate::QemuLaunch::argv`]).
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(SpecError::new(
                "vcpus",
                format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpus),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::new(
                "memory_mib",
                format!(
                    "must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} (1 TiB), got {}",
                    self.memory_mib
                ),
            ));
        }
        validate_cpu_model(&self.cpu_model)?;
        validate_machine(&self.machine)?;
        if let Some(accel) = &self.accel {
            validate_accel("accel", accel)?;
        }
        if let Some(k) = &self.kernel {
            validate_path("kernel", k)?;
        }
        if let Some(i) = &self.initrd {
            validate_path("initrd", i)?;
            if self.kernel.is_none() {
                return Err(SpecError::new("initrd", "requires kernel to be set"));
            }
        }
        if let Some(c) = &self.cmdline {
            if self.kernel.is_none() {
                return Err(SpecError::new("cmdline", "requires kernel to be set"));
            }
            if c.contains(['\0', '\n', '\r']) {
                return Err(SpecError::new(
                    "cmdline",
                    "must not contain NUL or line breaks",
                ));
            }
        }
        let mut ids = HashSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            validate_id(&format!("{field}.id"), &d.id, MAX_DISK_ID)?;
            if !ids.insert(d.id.as_str()) {
                return Err(SpecError::new(
                    format!("{field}.id"),
                    format!("duplicate disk id {:?}", d.id),
                ));
            }
            validate_path(&format!("{field}.path"), &d.path)?;
        }
        let mut ids = HashSet::new();
        for (i, n) in self.nics.iter().enumerate() {
            let field = format!("nics[{i}]");
            validate_id(&format!("{field}.id"), &n.id, MAX_NIC_ID)?;
            if !ids.insert(n.id.as_str()) {
                return Err(SpecError::new(
                    format!("{field}.id"),
                    format!("duplicate NIC id {:?}", n.id),
                ));
            }
            if let Some(mac) = &n.mac {
                validate_mac(&format!("{field}.mac"), mac)?;
            }
            if let NicBackend::Bridge { name } = &n.backend {
                validate_bridge(&format!("{field}.backend.name"), name)?;
            }
        }
        if self.kernel.is_none() && self.disks.is_empty() {
            return Err(SpecError::new(
                "kernel",
                "a VM needs a boot source: set kernel or add a disk",
            ));
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            "name",
            format!("{name:?} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"),
        ))
    }
}

fn validate_cpu_model(model: &str) -> Result<(), SpecError> {
    // Commas are allowed: they separate CPU feature flags, which is what a
    // user writing `qemu64,+ssse3` means.
    let ok = !model.is_empty()
        && model.len() <= 256
        && model.as_bytes()[0].is_ascii_alphanumeric()
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+=,".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            "cpu_model",
            format!("{model:?} must be a CPU model name optionally followed by ,feature flags (letters, digits, . _ - + = ,)"),
        ))
    }
}

fn validate_machine(machine: &str) -> Result<(), SpecError> {
    let ok = !machine.is_empty()
        && machine.len() <= 64
        && machine.as_bytes()[0].is_ascii_alphanumeric()
        && machine
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            "machine",
            format!("{machine:?} must be a QEMU machine type name such as {DEFAULT_MACHINE}"),
        ))
    }
}

pub(crate) fn validate_accel(field: &str, accel: &str) -> Result<(), SpecError> {
    if ACCELS.contains(&accel) {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{accel:?} must be one of {ACCELS:?}"),
        ))
    }
}

/// Paths must be absolute (QEMU's working directory is not ours to rely
/// on) and UTF-8 (the argument vector is `String`s).
pub(crate) fn validate_path(field: &str, path: &Path) -> Result<(), SpecError> {
    let Some(s) = path.to_str() else {
        return Err(SpecError::new(
            field,
            format!("{} is not valid UTF-8", path.display()),
        ));
    };
    if !path.is_absolute() {
        return Err(SpecError::new(
            field,
            format!("{s:?} must be an absolute path"),
        ));
    }
    if s.contains(['\0', '\n', '\r']) {
        return Err(SpecError::new(field, "must not contain NUL or line breaks"));
    }
    Ok(())
}

/// QEMU ids must start with a letter; we also keep out `.` so derived names
/// (`ID-file`, `vblk-ID`) stay unambiguous.
fn validate_id(field: &str, id: &str, max: usize) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= max
        && id.as_bytes()[0].is_ascii_alphabetic()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!(
                "{id:?} must start with a letter, contain only letters, digits, - and _, and be at most {max} characters"
            ),
        ))
    }
}

fn validate_mac(field: &str, mac: &str) -> Result<(), SpecError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(SpecError::new(
            field,
            format!("{mac:?} must look like 52:54:00:12:34:56"),
        ));
    }
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(1);
    if first & 1 != 0 {
        return Err(SpecError::new(
            field,
            format!("{mac:?} is a multicast address"),
        ));
    }
    Ok(())
}

fn validate_bridge(field: &str, name: &str) -> Result<(), SpecError> {
    // Linux interface names: at most 15 bytes, no '/', whitespace or ':'.
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!(
                "{name:?} must be a network interface name (at most 15 of letters, digits, . _ -)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> VmSpec {
        let mut s = VmSpec::new("vm-1.test_x", 512);
        s.kernel = Some("/boot/vmlinuz".into());
        s.disks.push(DiskSpec {
            id: "disk0".into(),
            path: "/var/lib/ferry/a,b.qcow2".into(),
            format: DiskFormat::Qcow2,
            bus: DiskBus::VirtioBlk,
            read_only: false,
        });
        s.nics.push(NicSpec {
            id: "net0".into(),
            mac: Some("52:54:00:aB:cd:ef".into()),
            backend: NicBackend::Bridge { name: "br0".into() },
        });
        s
    }

    fn err_field(s: &VmSpec) -> SpecError {
        s.validate().expect_err("must be rejected")
    }

    #[test]
    fn good_spec_validates() {
        good().validate().expect("valid");
        let mut s = good();
        s.kernel = None; // a disk is enough to boot from
        s.validate().expect("valid");
    }

    #[test]
    fn rejects_bad_names() {
        for name in [
            "",
            "-vm",
            ".vm",
            "vm,1",
            "vm 1",
            "vm/1",
            "vé",
            &"a".repeat(65),
        ] {
            let mut s = good();
            s.name = name.to_owned();
            let e = err_field(&s);
            assert_eq!(e.field, "name", "{name:?}");
            assert!(e.to_string().starts_with("name: "), "{e}");
        }
        let mut s = good();
        s.name = "a".repeat(64);
        s.validate().expect("64 chars is fine");
    }

    #[test]
    fn rejects_bad_sizes() {
        for (mem, vcpus, field) in [
            (15, 1, "memory_mib"),
            (MAX_MEMORY_MIB + 1, 1, "memory_mib"),
            (0, 1, "memory_mib"),
            (512, 0, "vcpus"),
            (512, 257, "vcpus"),
        ] {
            let mut s = good();
            s.memory_mib = mem;
            s.vcpus = vcpus;
            let e = err_field(&s);
            assert_eq!(e.field, field);
            assert!(e.message.contains("between"), "{e}");
        }
        let mut s = good();
        s.memory_mib = MAX_MEMORY_MIB;
        s.vcpus = MAX_VCPUS;
        s.validate().expect("limits are inclusive");
        s.memory_mib = MIN_MEMORY_MIB;
        s.validate().expect("limits are inclusive");
    }

    #[test]
    fn rejects_other_bad_fields() {
        type Mutation = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.accel = Some("hvf".into())), "accel"),
            (Box::new(|s| s.machine = "pc,accel=kvm".into()), "machine"),
            (Box::new(|s| s.cpu_model = "".into()), "cpu_model"),
            (Box::new(|s| s.cpu_model = "host cpu".into()), "cpu_model"),
            (Box::new(|s| s.kernel = Some("vmlinuz".into())), "kernel"),
            (
                Box::new(|s| {
                    s.kernel = None;
                    s.disks.clear();
                }),
                "kernel",
            ),
            (
                Box::new(|s| {
                    s.kernel = None;
                    s.initrd = Some("/i".into());
                }),
                "initrd",
            ),
            (Box::new(|s| s.cmdline = Some("a\nb".into())), "cmdline"),
            (Box::new(|s| s.disks[0].id = "0disk".into()), "disks[0].id"),
            (Box::new(|s| s.disks[0].id = "d,x".into()), "disks[0].id"),
            (Box::new(|s| s.disks[0].id = "d".repeat(27)), "disks[0].id"),
            (
                Box::new(|s| s.disks[0].path = "rel.qcow2".into()),
                "disks[0].path",
            ),
            (
                Box::new(|s| {
                    let d = s.disks[0].clone();
                    s.disks.push(d);
                }),
                "disks[1].id",
            ),
            (
                Box::new(|s| s.nics[0].mac = Some("52:54:00:12:34".into())),
                "nics[0].mac",
            ),
            (
                Box::new(|s| s.nics[0].mac = Some("01:00:5e:00:00:01".into())),
                "nics[0].mac",
            ),
            (
                Box::new(|s| {
                    s.nics[0].backend = NicBackend::Bridge {
                        name: "br0,x".into(),
                    }
                }),
                "nics[0].backend.name",
            ),
            (
                Box::new(|s| {
                    s.nics[0].backend = NicBackend::Bridge {
                        name: "a-very-long-bridge".into(),
                    }
                }),
                "nics[0].backend.name",
            ),
            (
                Box::new(|s| {
                    let n = s.nics[0].clone();
                    s.nics.push(n);
                }),
                "nics[1].id",
            ),
        ];
        for (mutate, field) in cases {
            let mut s = good();
            mutate(&mut s);
            let e = err_field(&s);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn toml_round_trip_and_defaults() {
        let text = r#"
            name = "web1"
            memory_mib = 256
            kernel = "/k"
            cmdline = "console=ttyS0,115200"

            [[disks]]
            id = "disk0"
            path = "/img.raw"
            format = "raw"
            read_only = true

            [[nics]]
            id = "net0"

            [[nics]]
            id = "net1"
            mac = "52:54:00:00:00:01"
            backend = { type = "bridge", name = "br0" }
        "#;
        let s: VmSpec = toml::from_str(text).expect("parse");
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.cpu_model, DEFAULT_CPU_MODEL);
        assert_eq!(s.machine, DEFAULT_MACHINE);
        assert_eq!(s.disks[0].format, DiskFormat::Raw);
        assert_eq!(s.disks[0].bus, DiskBus::VirtioBlk);
        assert!(s.disks[0].read_only);
        assert_eq!(s.nics[0].backend, NicBackend::User);
        assert_eq!(s.nics[1].backend, NicBackend::Bridge { name: "br0".into() });
        s.validate().expect("valid");

        let out = toml::to_string(&s).expect("serialize");
        let back: VmSpec = toml::from_str(&out).expect("reparse");
        assert_eq!(back, s);
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<VmSpec>(&json).expect("json back"), s);
    }
}
