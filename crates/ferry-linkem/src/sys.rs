//! Network namespaces, TUN devices, and the `ip` commands that configure them.

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// Which offloads a TUN device got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// Plain TUN: every packet at most one MTU.
    None,
    /// Checksum offload and TCP segmentation offload (TSO): TCP super-packets of up to 64 KiB.
    Tso,
    /// TSO plus UDP segmentation offload (USO, kernel >= 6.2): UDP GSO batches (QUIC) pass whole too.
    TsoUso,
}

impl Offload {
    pub fn describe(self) -> &'static str {
        match self {
            Offload::None => "none (plain TUN)",
            Offload::Tso => "vnet header, checksum + TSO",
            Offload::TsoUso => "vnet header, checksum + TSO + USO",
        }
    }
    pub fn vnet_hdr(self) -> bool {
        self != Offload::None
    }
}

/// A TUN device opened inside a namespace; the fd works from any namespace.
pub struct Tun {
    pub fd: OwnedFd,
    pub offload: Offload,
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Path of a named namespace made by `ip netns add`.
pub fn netns_path(ns: &str) -> String {
    format!("/var/run/netns/{ns}")
}

fn open_path(path: &str, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c =
        CString::new(path).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: plain open(2) of a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks that a named namespace exists, with a message that says how to make it.
pub fn check_netns(ns: &str) -> Result<()> {
    let p = netns_path(ns);
    match std::fs::metadata(&p) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("network namespace '{ns}' not found ({p} does not exist): create it with `ip netns add {ns}` (testbed/up.sh does)")
        }
        Err(e) => Err(anyhow!("network namespace '{ns}': cannot stat {p}: {e}")),
    }
}

fn setns(fd: RawFd, what: &str) -> Result<()> {
    // SAFETY: setns(2) on an fd we own; affects only the calling thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        let e = errno();
        if e.raw_os_error() == Some(libc::EPERM) {
            bail!("entering {what}: permission denied (ferry-linkem must run as root)");
        }
        bail!("entering {what}: {e}");
    }
    Ok(())
}

fn ifreq(name: &str, flags: libc::c_short) -> Result<[u8; 40]> {
    if name.is_empty()
        || name.len() > 15
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        bail!("bad TUN device name '{name}' (1 to 15 characters: letters, digits, - _ .)");
    }
    let mut r = [0u8; 40];
    r[..name.len()].copy_from_slice(name.as_bytes());
    r[16..18].copy_from_slice(&flags.to_ne_bytes());
    Ok(r)
}

fn open_tun_here(ns: &str, dev: &str, want_offload: bool) -> Result<Tun> {
    let fd = open_path("/dev/net/tun", libc::O_RDWR)
        .map_err(|e| anyhow!("opening /dev/net/tun in namespace '{ns}': {e}"))?;
    let flags = IFF_TUN | IFF_NO_PI | if want_offload { IFF_VNET_HDR } else { 0 };
    let mut req = ifreq(dev, flags)?;
    // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes) that we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } != 0 {
        let e = errno();
        if e.raw_os_error() == Some(libc::EBUSY) {
            bail!("TUN device '{dev}' in namespace '{ns}' is in use: is another ferry-linkem running? (testbed/down.sh stops it)");
        }
        bail!("creating TUN device '{dev}' in namespace '{ns}' (TUNSETIFF): {e}");
    }
    let mut offload = Offload::None;
    if want_offload {
        let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes the flags as the ioctl argument.
        if unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                TUNSETOFFLOAD as _,
                (base | TUN_F_USO4 | TUN_F_USO6) as libc::c_ulong,
            )
        } == 0
        {
            offload = Offload::TsoUso;
        } else if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, base as libc::c_ulong) }
            == 0
        {
            offload = Offload::Tso;
        } else {
            bail!("enabling offloads on TUN '{dev}' in namespace '{ns}' (TUNSETOFFLOAD): {}; try --no-offload", errno());
        }
    }
    // Keep IPv6 (router solicitations, MLD) off the emulated link; harmless if IPv6 is off.
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
    Ok(Tun { fd, offload })
}

/// Creates TUN device `dev` inside namespace `ns`: a helper thread enters the namespace,
/// opens `/dev/net/tun`, and returns to the original namespace before it ends. The fd
/// keeps working from any namespace.
pub fn open_tun_in_netns(ns: &str, dev: &str, want_offload: bool) -> Result<Tun> {
    check_netns(ns)?;
    let ns = ns.to_string();
    let dev = dev.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || -> Result<Tun> {
            let target = open_path(&netns_path(&ns), libc::O_RDONLY)
                .map_err(|e| anyhow!("opening {}: {e}", netns_path(&ns)))?;
            let home = open_path("/proc/thread-self/ns/net", libc::O_RDONLY)
                .context("opening this thread's network namespace")?;
            setns(target.as_raw_fd(), &format!("network namespace '{ns}'"))?;
            let tun = open_tun_here(&ns, &dev, want_offload);
            setns(home.as_raw_fd(), "the original network namespace")?;
            tun
        })
        .context("spawning the namespace thread")?
        .join()
        .map_err(|_| anyhow!("the namespace thread panicked"))?
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        anyhow!(
            "running `ip {}`: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    })?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Brings loopback up and gives the TUN device its address, MTU and up state.
pub fn configure(ns: &str, dev: &str, addr: &str, prefix: u8, mtu: u32) -> Result<()> {
    ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        "dev",
        dev,
        "mtu",
        &mtu.to_string(),
        "txqueuelen",
        "1000",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/{prefix}"),
        "dev",
        dev,
    ])?;
    ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
    Ok(())
}

/// Makes an fd non-blocking.
pub fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            bail!("fcntl(O_NONBLOCK): {}", errno());
        }
    }
    Ok(())
}
