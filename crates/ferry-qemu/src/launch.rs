//! Host-side launch settings and the QEMU argument vector.

use std::path::{Path, PathBuf};

use crate::spec::{validate_accel, validate_path, DiskBus, NicBackend, SpecError, VmSpec};

/// Longest usable unix socket path (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Escapes a value for QEMU's `key=value,key=value` option syntax, where a
/// literal comma is written `,,`.
pub fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Whether `p` can be a QEMU trace event pattern here: letters, digits, `_`, `-` and
/// `*` only (no `,` that would start another `-trace` option).
pub fn valid_trace_pattern(p: &str) -> bool {
    !p.is_empty()
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '*' | '-'))
}

/// A [`VmSpec`] plus the host-specific settings needed to start it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuLaunch {
    /// The VM.
    pub spec: VmSpec,
    /// The host's default accelerator (`kvm` or `tcg`); `spec.accel`
    /// overrides it.
    pub accel: String,
    /// Guest RAM file (`memory-backend-file` `mem-path`, shared so the
    /// agent can map it), typically under `/dev/shm`.
    pub ram_path: PathBuf,
    /// Directory for this QEMU's sockets, pidfile and logs.
    pub run_dir: PathBuf,
    /// Start as a migration target: `-S -incoming defer`.
    pub incoming: bool,
    /// `LD_PRELOAD` shim loaded into QEMU (the write-tracking userfaultfd
    /// shim).
    pub preload: Option<PathBuf>,
    /// Extra environment variables for QEMU.
    pub extra_env: Vec<(String, String)>,
    /// QEMU trace event patterns to enable (`-trace enable=...`), logged to
    /// [`QemuLaunch::trace_log`]; e.g. `vmstate_downtime*` says where a
    /// migration's pause goes inside QEMU.
    pub trace: Vec<String>,
}

impl QemuLaunch {
    /// A launch of `spec` with no incoming migration, preload or extra env.
    pub fn new(
        spec: VmSpec,
        accel: impl Into<String>,
        ram_path: impl Into<PathBuf>,
        run_dir: impl Into<PathBuf>,
    ) -> Self {
        QemuLaunch {
            spec,
            accel: accel.into(),
            ram_path: ram_path.into(),
            run_dir: run_dir.into(),
            incoming: false,
            preload: None,
            extra_env: Vec::new(),
            trace: Vec::new(),
        }
    }

    /// The accelerator QEMU will use: the spec's if set, else the host's.
    pub fn effective_accel(&self) -> &str {
        self.spec.accel.as_deref().unwrap_or(&self.accel)
    }

    /// `RUN/qmp.sock`: the QMP socket.
    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// `RUN/qmp-observe.sock`: a second QMP monitor the agent never holds, so that an
    /// operator or a test can ask the QEMU itself (`query-status`) while the agent is
    /// connected to the first one (a QMP socket serves one client at a time).
    pub fn observer_qmp_path(&self) -> PathBuf {
        self.run_dir.join("qmp-observe.sock")
    }

    /// `RUN/console.sock`: the serial console socket.
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join("console.sock")
    }

    /// `RUN/console.log`: everything the serial console printed.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// `RUN/qemu.pid`: QEMU's pidfile.
    pub fn pidfile(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }

    /// `RUN/qemu-trace.log`: QEMU's trace events, when [`QemuLaunch::trace`] names any.
    pub fn trace_log(&self) -> PathBuf {
        self.run_dir.join("qemu-trace.log")
    }

    /// `RUN/qemu.stderr`: QEMU's stdout and stderr.
    pub fn stderr_log(&self) -> PathBuf {
        self.run_dir.join("qemu.stderr")
    }

    /// Validates the spec and the host settings (accelerator, absolute UTF-8
    /// paths, socket paths short enough for `sun_path`, env names).
    pub fn validate(&self) -> Result<(), SpecError> {
        self.spec.validate()?;
        validate_accel("accel", self.effective_accel())?;
        validate_path("ram_path", &self.ram_path)?;
        validate_path("run_dir", &self.run_dir)?;
        for sock in [
            self.qmp_path(),
            self.observer_qmp_path(),
            self.console_path(),
        ] {
            let len = sock.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(SpecError::new("run_dir", format!("socket path {} is {len} bytes; unix sockets allow at most {MAX_SOCKET_PATH}", sock.display())));
            }
        }
        if let Some(p) = &self.preload {
            validate_path("preload", p)?;
        }
        for e in &self.trace {
            if !valid_trace_pattern(e) {
                return Err(SpecError::new(
                    "trace",
                    format!("{e:?} is not a trace event pattern (letters, digits, _ - *)"),
                ));
            }
        }
        for (k, v) in &self.extra_env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(SpecError::new(
                    "extra_env",
                    format!("{k:?} is not a valid environment variable"),
                ));
            }
        }
        Ok(())
    }

    /// The QEMU argument vector (without the binary).
    ///
    /// Values inside QEMU option lists are escaped with [`qemu_escape`];
    /// `-pidfile`, `-kernel`, `-initrd` and `-append` take their value
    /// verbatim in QEMU, so they are not escaped. Call
    /// [`QemuLaunch::validate`] first: non-UTF-8 paths are rendered lossily.
    pub fn argv(&self) -> Vec<String> {
        let s = &self.spec;
        let mem = format!("{}M", s.memory_mib);
        let esc_path = |p: &Path| qemu_escape(&p.to_string_lossy());
        let raw_path = |p: &Path| p.to_string_lossy().into_owned();

        let mut a: Vec<String> = Vec::with_capacity(64);
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));

        // Threads named by role ("CPU 0/TCG", "CPU 0/KVM", "live_migration", ...), as
        // libvirt runs QEMU: top, perf and the benchmark harness can tell a vCPU's time from
        // the rest of the process's.
        push(&[
            "-name",
            &format!("guest={},debug-threads=on", qemu_escape(&s.name)),
        ]);
        push(&[
            "-machine",
            &format!("{},memory-backend=ram0", qemu_escape(&s.machine)),
        ]);
        push(&["-accel", &qemu_escape(self.effective_accel())]);
        // cpu_model is "model[,features]" on purpose: not escaped.
        push(&["-cpu", &s.cpu_model]);
        push(&["-smp", &s.vcpus.to_string()]);
        push(&["-m", &mem]);
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=ram0,size={mem},mem-path={},share=on",
                esc_path(&self.ram_path)
            ),
        ]);
        push(&[
            "-nodefaults",
            "-vga",
            "none",
            "-display",
            "none",
            "-no-reboot",
        ]);
        // QEMU's own trace events, to its log in the run directory.
        if !self.trace.is_empty() {
            for e in &self.trace {
                push(&["-trace", &format!("enable={e}")]);
            }
            push(&["-D", &raw_path(&self.trace_log())]);
        }
        push(&["-pidfile", &raw_path(&self.pidfile())]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", esc_path(&self.qmp_path())),
        ]);
        push(&[
            "-qmp",
            &format!(
                "unix:{},server=on,wait=off",
                esc_path(&self.observer_qmp_path())
            ),
        ]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=ser0,path={},server=on,wait=off,logfile={}",
                esc_path(&self.console_path()),
                esc_path(&self.console_log())
            ),
        ]);
        push(&["-serial", "chardev:ser0"]);

        if let Some(k) = &s.kernel {
            push(&["-kernel", &raw_path(k)]);
        }
        if let Some(i) = &s.initrd {
            push(&["-initrd", &raw_path(i)]);
        }
        if let Some(c) = &s.cmdline {
            push(&["-append", c]);
        }

        for d in &s.disks {
            let ro = if d.read_only { ",read-only=on" } else { "" };
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,filename={},node-name={}-file{ro}",
                    esc_path(&d.path),
                    d.id
                ),
            ]);
            push(&[
                "-blockdev",
                &format!(
                    "driver={},file={}-file,node-name={}{ro}",
                    d.format.driver(),
                    d.id,
                    d.id
                ),
            ]);
            match d.bus {
                DiskBus::VirtioBlk => push(&[
                    "-device",
                    &format!("virtio-blk-pci,drive={},id=vblk-{}", d.id, d.id),
                ]),
            }
        }

        for n in &s.nics {
            let netdev = match &n.backend {
                NicBackend::User => format!("user,id={}", n.id),
                NicBackend::Bridge { name } => {
                    format!("bridge,id={},br={}", n.id, qemu_escape(name))
                }
            };
            push(&["-netdev", &netdev]);
            let mut dev = format!("virtio-net-pci,netdev={}", n.id);
            if let Some(mac) = &n.mac {
                dev.push_str(",mac=");
                dev.push_str(mac);
            }
            push(&["-device", &dev]);
        }

        if self.incoming {
            push(&["-S", "-incoming", "defer"]);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskFormat, DiskSpec, NicSpec};

    fn spec() -> VmSpec {
        let mut s = VmSpec::new("web1", 512);
        s.vcpus = 2;
        s.kernel = Some("/img/vmlinuz".into());
        s.initrd = Some("/img/initrd,1.gz".into());
        s.cmdline = Some("console=ttyS0,115200 panic=-1".into());
        s.disks.push(DiskSpec {
            id: "disk0".into(),
            path: "/var/lib/ferry/web,1.qcow2".into(),
            format: DiskFormat::Qcow2,
            bus: DiskBus::VirtioBlk,
            read_only: false,
        });
        s.disks.push(DiskSpec {
            id: "seed".into(),
            path: "/var/lib/ferry/seed.raw".into(),
            format: DiskFormat::Raw,
            bus: DiskBus::VirtioBlk,
            read_only: true,
        });
        s.nics.push(NicSpec {
            id: "net0".into(),
            mac: Some("52:54:00:12:34:56".into()),
            backend: NicBackend::Bridge { name: "br0".into() },
        });
        s.nics.push(NicSpec {
            id: "net1".into(),
            mac: None,
            backend: NicBackend::User,
        });
        s
    }

    fn launch(incoming: bool) -> QemuLaunch {
        let mut l = QemuLaunch::new(spec(), "tcg", "/dev/shm/ferry-web1", "/run/ferry/web1");
        l.incoming = incoming;
        l
    }

    #[test]
    fn argv_golden() {
        let l = launch(false);
        l.validate().expect("valid");
        let expected = [
            "-name",
            "guest=web1,debug-threads=on",
            "-machine",
            "pc-i440fx-7.2,memory-backend=ram0",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64",
            "-smp",
            "2",
            "-m",
            "512M",
            "-object",
            "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/ferry-web1,share=on",
            "-nodefaults",
            "-vga",
            "none",
            "-display",
            "none",
            "-no-reboot",
            "-pidfile",
            "/run/ferry/web1/qemu.pid",
            "-qmp",
            "unix:/run/ferry/web1/qmp.sock,server=on,wait=off",
            "-qmp",
            "unix:/run/ferry/web1/qmp-observe.sock,server=on,wait=off",
            "-chardev",
            "socket,id=ser0,path=/run/ferry/web1/console.sock,server=on,wait=off,logfile=/run/ferry/web1/console.log",
            "-serial",
            "chardev:ser0",
            "-kernel",
            "/img/vmlinuz",
            "-initrd",
            "/img/initrd,1.gz",
            "-append",
            "console=ttyS0,115200 panic=-1",
            "-blockdev",
            "driver=file,filename=/var/lib/ferry/web,,1.qcow2,node-name=disk0-file",
            "-blockdev",
            "driver=qcow2,file=disk0-file,node-name=disk0",
            "-device",
            "virtio-blk-pci,drive=disk0,id=vblk-disk0",
            "-blockdev",
            "driver=file,filename=/var/lib/ferry/seed.raw,node-name=seed-file,read-only=on",
            "-blockdev",
            "driver=raw,file=seed-file,node-name=seed,read-only=on",
            "-device",
            "virtio-blk-pci,drive=seed,id=vblk-seed",
            "-netdev",
            "bridge,id=net0,br=br0",
            "-device",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56",
            "-netdev",
            "user,id=net1",
            "-device",
            "virtio-net-pci,netdev=net1",
        ];
        assert_eq!(l.argv(), expected);
    }

    #[test]
    fn argv_incoming_and_accel_override() {
        let mut l = launch(true);
        l.spec.accel = Some("kvm".into());
        let a = l.argv();
        assert_eq!(&a[a.len() - 3..], ["-S", "-incoming", "defer"]);
        let i = a.iter().position(|x| x == "-accel").expect("accel");
        assert_eq!(a[i + 1], "kvm");
        assert_eq!(l.effective_accel(), "kvm");
        assert!(!launch(false).argv().contains(&"-incoming".to_owned()));
    }

    #[test]
    fn escapes_commas_in_run_dir_and_ram_path() {
        let mut l = launch(false);
        l.run_dir = "/run/a,b".into();
        l.ram_path = "/dev/shm/x,y".into();
        let a = l.argv();
        assert!(a.contains(&"unix:/run/a,,b/qmp.sock,server=on,wait=off".to_owned()));
        assert!(
            a.contains(&"/run/a,b/qemu.pid".to_owned()),
            "pidfile is taken verbatim"
        );
        assert!(a
            .iter()
            .any(|x| x.contains("mem-path=/dev/shm/x,,y,share=on")));
        assert_eq!(qemu_escape("a,,b"), "a,,,,b");
    }

    #[test]
    fn launch_validation() {
        let mut l = launch(false);
        l.accel = "xen".into();
        assert_eq!(l.validate().expect_err("accel").field, "accel");
        l.spec.accel = Some("tcg".into());
        l.validate().expect("spec accel overrides host");

        let mut l = launch(false);
        l.run_dir = PathBuf::from("/").join("d".repeat(100));
        let e = l.validate().expect_err("too long");
        assert_eq!(e.field, "run_dir");
        assert!(e.message.contains("at most 107"), "{e}");

        let mut l = launch(false);
        l.ram_path = "shm/x".into();
        assert_eq!(l.validate().expect_err("relative").field, "ram_path");

        let mut l = launch(false);
        l.extra_env.push(("A=B".into(), "c".into()));
        let mut t = l.clone();
        t.extra_env.clear();
        t.trace = vec!["vmstate_downtime*".into()];
        t.validate().expect("trace pattern");
        let argv = t.argv();
        assert!(argv
            .windows(2)
            .any(|w| w == ["-trace", "enable=vmstate_downtime*"]));
        assert!(argv.iter().any(|a| a.ends_with("qemu-trace.log")));
        t.trace = vec!["a,file=/etc/x".into()];
        assert_eq!(t.validate().expect_err("option syntax").field, "trace");
        assert_eq!(l.validate().expect_err("env").field, "extra_env");
    }
}
