//! VM spec files: TOML in the shape of [`ferry_qemu::VmSpec`], checked here (unknown keys
//! and invalid values are reported before anything is sent) and converted to the gRPC
//! [`ferry_api::v1::VmSpec`].

use anyhow::{bail, Context, Result};
use ferry_api::v1 as pb;
use ferry_qemu::VmSpec;
use std::path::Path;

const SPEC_KEYS: &[&str] = &[
    "name",
    "vcpus",
    "memory_mib",
    "memory_prealloc",
    "cpu_model",
    "machine",
    "accel",
    "kernel",
    "initrd",
    "cmdline",
    "disks",
    "nics",
];
const DISK_KEYS: &[&str] = &["id", "path", "format", "bus", "read_only"];
const NIC_KEYS: &[&str] = &["id", "mac", "backend"];
const BACKEND_KEYS: &[&str] = &["type", "name"];

/// Reads, checks and converts a spec file.
pub fn load_spec(path: &Path) -> Result<pb::VmSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading VM spec {}", path.display()))?;
    spec_from_toml(&text).with_context(|| format!("VM spec {}", path.display()))
}

/// Parses TOML text into a validated spec and converts it to its gRPC form.
///
/// Keys that [`ferry_qemu::VmSpec`] does not know are an error (serde would silently drop
/// a misspelt `memory = 512`), as is anything [`VmSpec::validate`] rejects.
pub fn spec_from_toml(text: &str) -> Result<pb::VmSpec> {
    let value: toml::Table = toml::from_str(text).context("invalid TOML")?;
    check_keys(&value)?;
    let spec: VmSpec = toml::from_str(text).context("invalid VM spec")?;
    spec.validate().context("invalid VM spec")?;
    Ok(spec_to_pb(&spec))
}

fn check_keys(table: &toml::Table) -> Result<()> {
    fn unknown(table: &toml::Table, known: &[&str], at: &str) -> Result<()> {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                bail!(
                    "unknown key `{at}{key}` (known keys here: {})",
                    known.join(", ")
                );
            }
        }
        Ok(())
    }
    unknown(table, SPEC_KEYS, "")?;
    let sub_tables = |key: &str| -> Vec<(usize, &toml::Table)> {
        match table.get(key) {
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.as_table().map(|t| (i, t)))
                .collect(),
            _ => Vec::new(),
        }
    };
    for (i, disk) in sub_tables("disks") {
        unknown(disk, DISK_KEYS, &format!("disks[{i}]."))?;
    }
    for (i, nic) in sub_tables("nics") {
        unknown(nic, NIC_KEYS, &format!("nics[{i}]."))?;
        if let Some(backend) = nic.get("backend").and_then(toml::Value::as_table) {
            unknown(backend, BACKEND_KEYS, &format!("nics[{i}].backend."))?;
        }
    }
    Ok(())
}

/// Converts a spec to its gRPC form (shared with the agent: `ferry_api::spec::to_pb`).
pub use ferry_api::spec::to_pb as spec_to_pb;

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        name = "web1"
        vcpus = 2
        memory_mib = 512
        memory_prealloc = true
        accel = "tcg"
        kernel = "/var/lib/ferry/vmlinuz"
        initrd = "/var/lib/ferry/initrd"
        cmdline = "console=ttyS0"

        [[disks]]
        id = "disk0"
        path = "/var/lib/ferry/web1.qcow2"

        [[disks]]
        id = "data"
        path = "/var/lib/ferry/data.raw"
        format = "raw"
        read_only = true

        [[nics]]
        id = "net0"

        [[nics]]
        id = "net1"
        mac = "52:54:00:12:34:56"
        backend = { type = "bridge", name = "br0" }
    "#;

    #[test]
    fn full_spec_converts() {
        let s = spec_from_toml(FULL).expect("valid");
        assert_eq!(s.name, "web1");
        assert_eq!(s.vcpus, 2);
        assert_eq!(s.memory_mib, 512);
        assert!(s.memory_prealloc);
        assert_eq!(s.cpu_model, ferry_qemu::DEFAULT_CPU_MODEL);
        assert_eq!(s.machine, ferry_qemu::DEFAULT_MACHINE);
        assert_eq!(s.accel, "tcg");
        assert_eq!(s.kernel, "/var/lib/ferry/vmlinuz");
        assert_eq!(s.initrd, "/var/lib/ferry/initrd");
        assert_eq!(s.cmdline, "console=ttyS0");
        assert_eq!(s.disks.len(), 2);
        assert_eq!(
            (s.disks[0].format.as_str(), s.disks[0].read_only),
            ("qcow2", false)
        );
        assert_eq!(
            (s.disks[1].format.as_str(), s.disks[1].read_only),
            ("raw", true)
        );
        assert_eq!(s.disks[1].path, "/var/lib/ferry/data.raw");
        assert_eq!(
            (s.nics[0].mac.as_str(), s.nics[0].bridge.as_str()),
            ("", "")
        );
        assert_eq!(
            (s.nics[1].mac.as_str(), s.nics[1].bridge.as_str()),
            ("52:54:00:12:34:56", "br0")
        );
    }

    #[test]
    fn minimal_spec_leaves_optional_fields_empty() {
        let s = spec_from_toml("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\n").expect("valid");
        assert_eq!(s.vcpus, 1);
        assert!(
            !s.memory_prealloc,
            "RAM is allocated as the guest writes it"
        );
        assert_eq!(s.accel, "");
        assert_eq!(s.initrd, "");
        assert_eq!(s.cmdline, "");
        assert!(s.disks.is_empty() && s.nics.is_empty());
    }

    fn err(text: &str) -> String {
        format!("{:#}", spec_from_toml(text).expect_err("must be rejected"))
    }

    #[test]
    fn bad_specs_are_rejected_with_the_field() {
        let e = err("name = \"a\"\nmemory = 64\nkernel = \"/k\"\n");
        assert!(e.contains("unknown key `memory`"), "{e}");
        let e = err("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\n[[disks]]\nid = \"d\"\npath = \"/d\"\nfromat = \"raw\"\n");
        assert!(e.contains("unknown key `disks[0].fromat`"), "{e}");
        let e = err("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\n[[nics]]\nid = \"n\"\nbackend = { type = \"bridge\", bridge = \"br0\" }\n");
        assert!(e.contains("unknown key `nics[0].backend.bridge`"), "{e}");
        let e = err("name = \"a\"\nmemory_mib = 4\nkernel = \"/k\"\n");
        assert!(e.contains("memory_mib: must be between"), "{e}");
        let e = err("name = \"a\"\nmemory_mib = 64\nkernel = \"vmlinuz\"\n");
        assert!(
            e.contains("kernel: \"vmlinuz\" must be an absolute path"),
            "{e}"
        );
        let e = err("name = \"a\"\nmemory_mib = 64\nkernel = \"/k\"\n[[disks]]\nid = \"d\"\npath = \"/d\"\nformat = \"vmdk\"\n");
        assert!(e.contains("invalid VM spec"), "{e}");
        let e = err("memory_mib = 64\n");
        assert!(e.contains("name"), "{e}");
        let e = err("name = [");
        assert!(e.contains("invalid TOML"), "{e}");
    }

    #[test]
    fn load_spec_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("web1.toml");
        std::fs::write(&p, FULL).expect("write");
        assert_eq!(load_spec(&p).expect("valid").name, "web1");
        let e = format!(
            "{:#}",
            load_spec(&dir.path().join("nope.toml")).expect_err("missing")
        );
        assert!(e.contains("nope.toml"), "{e}");
    }
}
