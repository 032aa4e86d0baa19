//! End to end: the LD_PRELOAD shim creates a userfaultfd inside a child process (a python3
//! that writes to a MAP_SHARED /dev/shm file on command, standing in for QEMU), the tracker
//! takes it over with pidfd_getfd and reports the child's writes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use ferry_memory::{
    install_shim, DirtyTracker, RamFile, TrackerError, TrackerKind, UffdTracker, DEFAULT_SHIM_FD,
    PAGE_SIZE, SHIM_FD_ENV,
};

const SCRIPT: &str = r#"
import mmap, os, sys
path, size = sys.argv[1], int(sys.argv[2])
f = open(path, 'r+b')
m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
fdnum = os.environ.get('FERRY_UFFD_FD', '1023')
try:
    link = os.readlink('/proc/self/fd/' + fdnum)
except OSError:
    link = 'none'
print('ready', os.getpid(), link, os.environ.get('LD_PRELOAD', '<unset>').replace(' ', '+'), flush=True)
for line in sys.stdin:
    w = line.split()
    if not w:
        continue
    if w[0] == 'w':
        for p in w[1:]:
            i = int(p) * 4096
            m[i] = (m[i] + 1) % 256 or 1
        print('ok', flush=True)
    elif w[0] == 'r':
        print(' '.join(str(m[int(p) * 4096]) for p in w[1:]), flush=True)
    else:
        break
"#;

/// The real python3 binary: a pyenv shim is a shell script, and LD_PRELOAD would then
/// create the userfaultfd in the shell, which exec()s it away.
fn python() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is installed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A child python mapping the RAM file; killed on drop.
struct Writer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: i32,
    fd_link: String,
    ld_preload: String,
}

impl Writer {
    fn spawn(ram: &Path, len: u64, setup: impl FnOnce(&mut Command)) -> Writer {
        let mut cmd = Command::new(python());
        cmd.args(["-c", SCRIPT])
            .arg(ram)
            .arg(len.to_string())
            .env_remove("LD_PRELOAD")
            .env_remove(SHIM_FD_ENV)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        setup(&mut cmd);
        let mut child = cmd.spawn().expect("spawn python3");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.first(), Some(&"ready"), "child said {line:?}");
        Writer {
            pid: child.id() as i32,
            fd_link: f[2].to_string(),
            ld_preload: f[3].to_string(),
            child,
            stdin,
            stdout,
        }
    }

    fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn write_pages(&mut self, pages: &[u64]) {
        let c = format!(
            "w {}",
            pages
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert_eq!(self.cmd(&c), "ok");
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    shim: PathBuf,
    ram_path: PathBuf,
    ram: RamFile,
}

fn setup(pages: u64) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("ferry-shim-test")
        .tempdir_in("/dev/shm")
        .unwrap();
    let shim = install_shim(dir.path()).unwrap();
    let ram_path = dir.path().join("guest-ram");
    let ram = RamFile::create(&ram_path, pages * PAGE_SIZE as u64).unwrap();
    Setup {
        _dir: dir,
        shim,
        ram_path,
        ram,
    }
}

fn sorted(bm: &ferry_memory::DirtyBitmap) -> Vec<u64> {
    bm.iter().collect()
}

#[test]
fn install_shim_writes_executable_library() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup(1);
    let meta = std::fs::metadata(&s.shim).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(std::fs::read(&s.shim).unwrap(), ferry_memory::UFFD_SHIM_SO);
    assert!(ferry_memory::UFFD_SHIM_SO.starts_with(b"\x7fELF"));
    // Installing again (e.g. agent restart) replaces it in place.
    assert_eq!(install_shim(s.shim.parent().unwrap()).unwrap(), s.shim);
}

#[test]
fn full_chain_with_shim() {
    let s = setup(256);
    let len = s.ram.len();
    let mut child = Writer::spawn(&s.ram_path, len, |c| {
        c.env("LD_PRELOAD", &s.shim);
    });
    assert_eq!(
        child.fd_link, "anon_inode:[userfaultfd]",
        "shim must park a uffd at fd 1023"
    );
    assert_eq!(
        child.ld_preload, "<unset>",
        "shim must remove itself from LD_PRELOAD"
    );

    let mut t = UffdTracker::attach(child.pid, DEFAULT_SHIM_FD, &s.ram_path, len).unwrap();
    t.arm().unwrap();
    child.write_pages(&[5, 77, 200]);
    let got = t.collect().unwrap();
    assert_eq!(got.len_pages(), 256);
    assert_eq!(sorted(&got), vec![5, 77, 200]);

    // The test (another process) writes page 10 through its own mapping: the child sees the
    // data, the tracker does not report it (it watches the child's page tables only), and
    // tracking of the child's own writes carries on.
    s.ram.write_page(10, &[0x42u8; PAGE_SIZE]).unwrap();
    assert_eq!(child.cmd("r 10"), "66");
    child.write_pages(&[6, 255]);
    let got = t.collect().unwrap();
    assert_eq!(
        sorted(&got),
        vec![6, 255],
        "foreign write must not be reported"
    );
    assert_eq!(
        t.collect().unwrap().count(),
        0,
        "nothing written, nothing reported"
    );

    // The child writes the page we wrote: now it is reported.
    child.write_pages(&[10]);
    assert_eq!(sorted(&t.collect().unwrap()), vec![10]);

    // Drop unregisters; a second attach to the same uffd (UFFDIO_API already done, so the
    // kernel refuses it with EINVAL) must still work.
    drop(t);
    let mut t2 = TrackerKind::Uffd
        .attach(child.pid, DEFAULT_SHIM_FD, &s.ram_path, len)
        .unwrap();
    t2.arm().unwrap();
    child.write_pages(&[0, 128]);
    assert_eq!(sorted(&t2.collect().unwrap()), vec![0, 128]);
    t2.disarm().unwrap();
    assert_eq!(child.cmd("q"), "");
}

#[test]
fn without_shim_attach_fails_clearly() {
    let s = setup(16);
    let child = Writer::spawn(&s.ram_path, s.ram.len(), |_| {});
    assert_eq!(child.fd_link, "none");
    let e = UffdTracker::attach(child.pid, DEFAULT_SHIM_FD, &s.ram_path, s.ram.len()).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, TrackerError::Os { .. }));
    assert!(e.to_string().contains("no fd 1023 in pid"), "{e}");
}

#[test]
fn wrong_length_is_a_mapping_error() {
    let s = setup(16);
    let mut child = Writer::spawn(&s.ram_path, s.ram.len(), |c| {
        c.env("LD_PRELOAD", &s.shim);
    });
    let e =
        UffdTracker::attach(child.pid, DEFAULT_SHIM_FD, &s.ram_path, 2 * s.ram.len()).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, TrackerError::MappingNotFound { .. }), "{e}");
    child.write_pages(&[1]);
}

#[test]
fn shim_honours_fd_env_and_keeps_other_preloads() {
    let s = setup(16);
    let mut child = Writer::spawn(&s.ram_path, s.ram.len(), |c| {
        // Space-separated, ours last: the other entry must survive.
        c.env("LD_PRELOAD", format!("libc.so.6 {}", s.shim.display()))
            .env(SHIM_FD_ENV, "900");
    });
    assert_eq!(child.fd_link, "anon_inode:[userfaultfd]");
    assert_eq!(child.ld_preload, "libc.so.6");
    let mut t = UffdTracker::attach(child.pid, 900, &s.ram_path, s.ram.len()).unwrap();
    t.arm().unwrap();
    child.write_pages(&[15]);
    assert_eq!(sorted(&t.collect().unwrap()), vec![15]);
}

#[test]
fn shim_never_clobbers_an_open_fd() {
    let s = setup(16);
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let child = Writer::spawn(&s.ram_path, s.ram.len(), |c| {
        c.env("LD_PRELOAD", &s.shim);
        use std::os::fd::AsRawFd;
        let fd = devnull.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; runs in the forked child before exec.
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(fd, DEFAULT_SHIM_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    assert_eq!(child.fd_link, "/dev/null");
    assert_eq!(child.ld_preload, "<unset>");
    let e = UffdTracker::attach(child.pid, DEFAULT_SHIM_FD, &s.ram_path, s.ram.len()).unwrap_err();
    eprintln!("{e}");
    assert!(e.to_string().contains("not a userfaultfd"), "{e}");
}
