//! `ferry-linkem`: joins network namespaces in a star through TUN devices and shapes each
//! direction of each pair of hosts (rate, queue, loss, delay). See `testbed/README.md`.
//!
//! Threads: one reader per TUN (read, route by IPv4 destination, decide loss, admit into
//! the link's queue), one scheduler (sleeps until the earliest release time of any link,
//! a `BinaryHeap` of link heads, then writes the due packets into the destination TUNs),
//! and the main thread (signals: SIGUSR1 prints counters, SIGTERM/SIGINT stop).

mod sys;

use anyhow::{bail, Context, Result};
use clap::Parser;
use ferry_linkem::gso::{self, VnetHdr, VNET_HDR_LEN};
use ferry_linkem::profile::{self, LinkSpec, MAX_PACKET};
use ferry_linkem::shape::{Link, LossGen, Refused};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Userspace link emulator: TUN devices in network namespaces, joined in a star, with
/// rate, queue (one bandwidth-delay product, drop-tail), loss and delay per direction.
#[derive(Debug, Parser)]
#[command(name = "ferry-linkem", version, about)]
struct Cli {
    /// A host: a network namespace (made by `ip netns add`) and the address its TUN
    /// device gets, e.g. `ferry-h1=10.77.0.1/24`. Give it once per host (at least two).
    #[arg(long = "host", value_name = "NETNS=ADDR[/PREFIX]", required = true, value_parser = parse_host)]
    hosts: Vec<HostArg>,
    /// Link profile between every pair: lan (no shaping), dc (10 Gbit/s, 0.5 ms RTT),
    /// wan (1 Gbit/s, 20 ms RTT), far (200 Mbit/s, 50 ms RTT, 0.1% loss).
    #[arg(long, default_value = "lan", value_parser = clap::builder::PossibleValuesParser::new(LinkSpec::PROFILES))]
    profile: String,
    /// Override the profile's rate (bits/s): 500mbit, 1gbit, 10gbit, 0 = unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_rate_arg)]
    rate: Option<RateArg>,
    /// Override the profile's round-trip time (half per direction): 10ms, 500us.
    #[arg(long, value_name = "DURATION", value_parser = profile::parse_duration_ns)]
    rtt: Option<u64>,
    /// Override the profile's loss probability per segment: 0.01 or 1%.
    #[arg(long, value_name = "P", value_parser = profile::parse_loss)]
    loss: Option<f64>,
    /// Queue limit per direction in bytes (default: one bandwidth-delay product).
    #[arg(long, value_name = "BYTES", value_parser = profile::parse_bytes)]
    queue: Option<u64>,
    /// A different link for one pair (both directions), e.g.
    /// `--link ferry-h1,ferry-h3=far` or `--link ferry-h1,ferry-h2=rate=100mbit,rtt=80ms,loss=0.5%`.
    #[arg(long = "link", value_name = "NETNS1,NETNS2=SPEC", value_parser = parse_link_override)]
    links: Vec<LinkOverride>,
    /// Name of the TUN device inside each namespace.
    #[arg(long, default_value = "ferry0", value_name = "NAME")]
    tun_name: String,
    /// MTU of the TUN devices (default 1500 with offload, 9000 without).
    #[arg(long, value_name = "BYTES")]
    mtu: Option<u32>,
    /// Plain TUN without virtio-net header and offloads (every packet <= MTU; slower).
    #[arg(long)]
    no_offload: bool,
    /// Do not run `ip` to bring loopback and the TUN devices up with their addresses.
    #[arg(long)]
    no_config: bool,
    /// Write counters as JSON to this file every --stats-interval, on SIGUSR1 and at exit.
    #[arg(long, value_name = "FILE")]
    stats_file: Option<PathBuf>,
    /// Seconds between writes of --stats-file.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    stats_interval: f64,
    /// Write this file (with the pid) once every device is up; removed at exit.
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Seed of the loss generators (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

/// `--rate`: `None` inside is unlimited.
#[derive(Clone, Copy, Debug)]
struct RateArg(Option<u64>);

fn parse_rate_arg(s: &str) -> Result<RateArg, String> {
    profile::parse_rate(s).map(RateArg)
}

#[derive(Clone, Debug)]
struct HostArg {
    netns: String,
    addr: Ipv4Addr,
    prefix: u8,
}

fn parse_host(s: &str) -> Result<HostArg, String> {
    let (ns, a) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NETNS=ADDR[/PREFIX]"))?;
    if ns.is_empty() || ns.contains('/') {
        return Err(format!("'{s}': bad namespace name"));
    }
    let (addr, prefix) = match a.split_once('/') {
        Some((a, p)) => (
            a,
            p.parse::<u8>()
                .ok()
                .filter(|p| (1..=32).contains(p))
                .ok_or_else(|| format!("'{s}': bad prefix"))?,
        ),
        None => (a, 24),
    };
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("'{s}': bad IPv4 address '{addr}'"))?;
    Ok(HostArg {
        netns: ns.to_string(),
        addr,
        prefix,
    })
}

#[derive(Clone, Debug)]
struct LinkOverride {
    a: String,
    b: String,
    spec: LinkSpec,
}

fn parse_link_override(s: &str) -> Result<LinkOverride, String> {
    let (pair, spec) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected NETNS1,NETNS2=SPEC"))?;
    let (a, b) = pair
        .split_once(',')
        .ok_or_else(|| format!("'{s}': expected NETNS1,NETNS2=SPEC"))?;
    Ok(LinkOverride {
        a: a.to_string(),
        b: b.to_string(),
        spec: LinkSpec::parse_spec(spec)?,
    })
}

/// A packet in a link: the bytes to write (virtio header included when offloading).
struct Pkt {
    buf: Vec<u8>,
    segments: u32,
    wire_bytes: u64,
}

/// Counters of one direction of one link.
#[derive(Default)]
struct LinkStats {
    fwd_pkts: AtomicU64,
    fwd_segs: AtomicU64,
    fwd_bytes: AtomicU64,
    qdrop_pkts: AtomicU64,
    qdrop_segs: AtomicU64,
    qdrop_bytes: AtomicU64,
    loss_segs: AtomicU64,
    loss_bytes: AtomicU64,
}

/// Counters of one TUN device.
#[derive(Default)]
struct TunStats {
    rx_pkts: AtomicU64,
    rx_bytes: AtomicU64,
    unroutable: AtomicU64,
    not_ipv4: AtomicU64,
    write_errors: AtomicU64,
}

/// Recycled packet buffers in two sizes, so the steady state allocates nothing.
struct Pool {
    small: Mutex<Vec<Vec<u8>>>,
    big: Mutex<Vec<Vec<u8>>>,
}

const SMALL_BUF: usize = 2048;
const BIG_BUF: usize = VNET_HDR_LEN + MAX_PACKET + 64;
const POOL_KEEP: usize = 4096;

impl Pool {
    fn get(&self, data: &[u8]) -> Vec<u8> {
        let (list, cap) = if data.len() <= SMALL_BUF {
            (&self.small, SMALL_BUF)
        } else {
            (&self.big, BIG_BUF)
        };
        let mut v = list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(cap));
        v.clear();
        v.extend_from_slice(data);
        v
    }
    fn put(&self, v: Vec<u8>) {
        let list = if v.capacity() >= BIG_BUF {
            &self.big
        } else if v.capacity() >= SMALL_BUF {
            &self.small
        } else {
            return;
        };
        let mut l = list.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() < POOL_KEEP {
            l.push(v);
        }
    }
}

/// Link queues and the heap of their heads, shared by readers and the scheduler.
struct Core {
    links: Vec<Link<Pkt>>,
    /// (release time of the link's oldest packet, link index), one entry per non-empty link.
    heap: BinaryHeap<Reverse<(u64, usize)>>,
}

struct Shared {
    hosts: Vec<HostArg>,
    n: usize,
    fds: Vec<RawFd>,
    vnet: bool,
    specs: Vec<LinkSpec>,
    core: Mutex<Core>,
    wake: Condvar,
    stop: AtomicBool,
    stop_pipe: [RawFd; 2],
    links: Vec<LinkStats>,
    tuns: Vec<TunStats>,
    pool: Pool,
    start: Instant,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn route(&self, dst: [u8; 4]) -> Option<usize> {
        let d = Ipv4Addr::from(dst);
        self.hosts.iter().position(|h| h.addr == d)
    }

    fn write_pkt(&self, to: usize, bytes: &[u8]) -> bool {
        // SAFETY: write(2) of a byte slice to an fd that lives as long as `self`.
        let r = unsafe { libc::write(self.fds[to], bytes.as_ptr().cast(), bytes.len()) };
        if r < 0 {
            self.tuns[to].write_errors.fetch_add(1, Relaxed);
            false
        } else {
            true
        }
    }

    fn count_forwarded(&self, li: usize, segments: u32, wire: u64) {
        let s = &self.links[li];
        s.fwd_pkts.fetch_add(1, Relaxed);
        s.fwd_segs.fetch_add(segments as u64, Relaxed);
        s.fwd_bytes.fetch_add(wire, Relaxed);
    }

    /// Sends one packet (after loss) into link `li` towards host `to`.
    fn deliver(&self, li: usize, to: usize, bytes: &[u8], segments: u32, wire: u64) {
        let spec = &self.specs[li];
        if spec.rate_bps.is_none() && spec.rtt_ns == 0 {
            if self.write_pkt(to, bytes) {
                self.count_forwarded(li, segments, wire);
            }
            return;
        }
        let pkt = Pkt {
            buf: self.pool.get(bytes),
            segments,
            wire_bytes: wire,
        };
        let mut core = self.core.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = core.links[li].is_empty();
        let earliest = core.heap.peek().map(|Reverse((t, _))| *t);
        match core.links[li].offer(self.now_ns(), wire, pkt) {
            Ok(release) => {
                if was_empty {
                    core.heap.push(Reverse((release, li)));
                    if earliest.is_none_or(|e| release < e) {
                        drop(core);
                        self.wake.notify_one();
                    }
                }
            }
            Err((Refused::QueueFull, pkt)) => {
                drop(core);
                let s = &self.links[li];
                s.qdrop_pkts.fetch_add(1, Relaxed);
                s.qdrop_segs.fetch_add(pkt.segments as u64, Relaxed);
                s.qdrop_bytes.fetch_add(pkt.wire_bytes, Relaxed);
                self.pool.put(pkt.buf);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

fn reader(sh: Arc<Shared>, from: usize, seed: u64) {
    let fd = sh.fds[from];
    let mut buf = vec![0u8; BIG_BUF];
    let mut loss: Vec<LossGen> = (0..sh.n)
        .map(|to| {
            LossGen::new(
                sh.specs[from * sh.n + to].loss,
                seed ^ ((from * 1000 + to) as u64).wrapping_mul(0x9E37_79B9),
            )
        })
        .collect();
    let ts = &sh.tuns[from];
    while !sh.stopping() {
        // SAFETY: read(2) into a buffer we own.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    let mut p = [
                        libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: sh.stop_pipe[0],
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: poll(2) on two pollfds we own.
                    unsafe { libc::poll(p.as_mut_ptr(), 2, 1000) };
                    continue;
                }
                _ => {
                    eprintln!(
                        "ferry-linkem: reading TUN of {}: {e}; this host's reader stops",
                        sh.hosts[from].netns
                    );
                    return;
                }
            }
        }
        let pkt = &buf[..r as usize];
        ts.rx_pkts.fetch_add(1, Relaxed);
        ts.rx_bytes.fetch_add(pkt.len() as u64, Relaxed);
        let (hdr, ip) = if sh.vnet {
            match VnetHdr::parse(pkt) {
                Some(h) => (h, &pkt[VNET_HDR_LEN..]),
                None => continue,
            }
        } else {
            (VnetHdr::default(), pkt)
        };
        let Some(dst) = gso::ipv4_dst(ip) else {
            ts.not_ipv4.fetch_add(1, Relaxed);
            continue;
        };
        let to = match sh.route(dst) {
            Some(to) if to != from => to,
            _ => {
                ts.unroutable.fetch_add(1, Relaxed);
                continue;
            }
        };
        let li = from * sh.n + to;
        let ws = gso::wire_size(&hdr, ip);
        match loss[to].lost_segments(ws.segments) {
            None => sh.deliver(li, to, pkt, ws.segments, ws.bytes),
            Some(lost) => {
                let s = &sh.links[li];
                let split = ws.segments > 1
                    && sh.vnet
                    && gso::split_segments(pkt, |i, seg| {
                        let seg_ip = &seg[VNET_HDR_LEN..];
                        if lost.binary_search(&i).is_ok() {
                            s.loss_segs.fetch_add(1, Relaxed);
                            s.loss_bytes.fetch_add(seg_ip.len() as u64, Relaxed);
                        } else {
                            sh.deliver(li, to, seg, 1, seg_ip.len() as u64);
                        }
                    })
                    .is_some();
                if !split {
                    // A plain packet, or a super-packet we cannot split: all of it is lost.
                    s.loss_segs.fetch_add(ws.segments as u64, Relaxed);
                    s.loss_bytes.fetch_add(ws.bytes, Relaxed);
                }
            }
        }
    }
}

fn scheduler(sh: Arc<Shared>) {
    // Precise wake-ups: the default timer slack (50 us) would blur the dc profile's 0.25 ms.
    // SAFETY: prctl on the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
    let mut batch: Vec<(usize, Pkt)> = Vec::with_capacity(1024);
    loop {
        {
            let mut core = sh.core.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if sh.stopping() {
                    let Core { links, heap } = &mut *core;
                    heap.clear();
                    for l in links.iter_mut() {
                        for p in l.drain() {
                            sh.pool.put(p.buf);
                        }
                    }
                    return;
                }
                let now = sh.now_ns();
                while let Some(&Reverse((t, li))) = core.heap.peek() {
                    if t > now {
                        break;
                    }
                    core.heap.pop();
                    while let Some(p) = core.links[li].pop_due(now) {
                        batch.push((li, p));
                    }
                    if let Some(r) = core.links[li].next_release() {
                        core.heap.push(Reverse((r, li)));
                    }
                }
                if !batch.is_empty() {
                    break;
                }
                let wait = match core.heap.peek() {
                    Some(&Reverse((t, _))) => Duration::from_nanos(t - now),
                    None => Duration::from_millis(200),
                };
                core = sh
                    .wake
                    .wait_timeout(core, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        for (li, p) in batch.drain(..) {
            let to = li % sh.n;
            if sh.write_pkt(to, &p.buf) {
                sh.count_forwarded(li, p.segments, p.wire_bytes);
            }
            sh.pool.put(p.buf);
        }
    }
}

fn stats_text(sh: &Shared, title: &str) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ferry-linkem counters ({title}, up {:.1} s)",
        sh.start.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        s,
        "  {:<30} {:>10} {:>12} {:>14} {:>10} {:>12} {:>10}  spec",
        "link", "packets", "segments", "bytes", "q-drop pk", "q-drop segs", "loss segs"
    );
    for from in 0..sh.n {
        for to in 0..sh.n {
            if from == to {
                continue;
            }
            let li = from * sh.n + to;
            let l = &sh.links[li];
            let _ = writeln!(
                s,
                "  {:<30} {:>10} {:>12} {:>14} {:>10} {:>12} {:>10}  {}",
                format!("{} -> {}", sh.hosts[from].netns, sh.hosts[to].netns),
                l.fwd_pkts.load(Relaxed),
                l.fwd_segs.load(Relaxed),
                l.fwd_bytes.load(Relaxed),
                l.qdrop_pkts.load(Relaxed),
                l.qdrop_segs.load(Relaxed),
                l.loss_segs.load(Relaxed),
                sh.specs[li]
            );
        }
    }
    for (i, t) in sh.tuns.iter().enumerate() {
        let _ = writeln!(
            s,
            "  tun of {:<22} read {} packets / {} bytes, unroutable {}, not IPv4 {}, write errors {}",
            sh.hosts[i].netns,
            t.rx_pkts.load(Relaxed),
            t.rx_bytes.load(Relaxed),
            t.unroutable.load(Relaxed),
            t.not_ipv4.load(Relaxed),
            t.write_errors.load(Relaxed)
        );
    }
    s
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn stats_json(sh: &Shared) -> String {
    let mut links = Vec::new();
    for from in 0..sh.n {
        for to in 0..sh.n {
            if from == to {
                continue;
            }
            let li = from * sh.n + to;
            let l = &sh.links[li];
            let sp = &sh.specs[li];
            links.push(format!(
                "{{\"from\":{},\"to\":{},\"rate_bps\":{},\"rtt_ns\":{},\"loss\":{},\"queue_bytes\":{},\
                 \"forwarded_packets\":{},\"forwarded_segments\":{},\"forwarded_bytes\":{},\
                 \"queue_dropped_packets\":{},\"queue_dropped_segments\":{},\"queue_dropped_bytes\":{},\
                 \"loss_dropped_segments\":{},\"loss_dropped_bytes\":{}}}",
                json_str(&sh.hosts[from].netns),
                json_str(&sh.hosts[to].netns),
                sp.rate_bps.map_or("null".into(), |r| r.to_string()),
                sp.rtt_ns,
                sp.loss,
                if sp.rate_bps.is_some() { sp.queue_limit().to_string() } else { "null".into() },
                l.fwd_pkts.load(Relaxed),
                l.fwd_segs.load(Relaxed),
                l.fwd_bytes.load(Relaxed),
                l.qdrop_pkts.load(Relaxed),
                l.qdrop_segs.load(Relaxed),
                l.qdrop_bytes.load(Relaxed),
                l.loss_segs.load(Relaxed),
                l.loss_bytes.load(Relaxed),
            ));
        }
    }
    let tuns: Vec<String> = sh
        .tuns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "{{\"netns\":{},\"addr\":\"{}\",\"rx_packets\":{},\"rx_bytes\":{},\"unroutable\":{},\"not_ipv4\":{},\"write_errors\":{}}}",
                json_str(&sh.hosts[i].netns),
                sh.hosts[i].addr,
                t.rx_pkts.load(Relaxed),
                t.rx_bytes.load(Relaxed),
                t.unroutable.load(Relaxed),
                t.not_ipv4.load(Relaxed),
                t.write_errors.load(Relaxed)
            )
        })
        .collect();
    format!(
        "{{\"pid\":{},\"uptime_s\":{:.3},\"links\":[{}],\"tuns\":[{}]}}\n",
        std::process::id(),
        sh.start.elapsed().as_secs_f64(),
        links.join(","),
        tuns.join(",")
    )
}

fn write_stats_file(sh: &Shared, path: &Option<PathBuf>) {
    if let Some(p) = path {
        let tmp = p.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, stats_json(sh)).and_then(|_| std::fs::rename(&tmp, p))
        {
            eprintln!("ferry-linkem: writing {}: {e}", p.display());
        }
    }
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local value.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn run(cli: Cli) -> Result<()> {
    // Block the signals before any thread starts, so that only sigtimedwait sees them.
    let set = signal_set();
    // SAFETY: changing this thread's signal mask; later threads inherit it.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ferry-linkem must run as root: it enters network namespaces (setns) and creates TUN devices");
    }
    let n = cli.hosts.len();
    if n < 2 {
        bail!("give at least two --host NETNS=ADDR");
    }
    for (i, h) in cli.hosts.iter().enumerate() {
        if cli.hosts[..i].iter().any(|o| o.netns == h.netns) {
            bail!("namespace '{}' given twice", h.netns);
        }
        if cli.hosts[..i].iter().any(|o| o.addr == h.addr) {
            bail!("address {} given twice", h.addr);
        }
    }
    for h in &cli.hosts {
        sys::check_netns(&h.netns)?;
    }

    let Some(mut base) = LinkSpec::profile(&cli.profile) else {
        bail!("unknown link profile {:?}", cli.profile)
    };
    if let Some(RateArg(r)) = cli.rate {
        base.rate_bps = r;
    }
    if let Some(r) = cli.rtt {
        base.rtt_ns = r;
    }
    if let Some(l) = cli.loss {
        base.loss = l;
    }
    if cli.queue.is_some() {
        base.queue_bytes = cli.queue;
    }
    let mut specs = vec![base; n * n];
    for o in &cli.links {
        let idx = |name: &str| {
            cli.hosts
                .iter()
                .position(|h| h.netns == name)
                .with_context(|| format!("--link names '{name}', which is not a --host"))
        };
        let (a, b) = (idx(&o.a)?, idx(&o.b)?);
        if a == b {
            bail!("--link {},{}: a link joins two different hosts", o.a, o.b);
        }
        specs[a * n + b] = o.spec;
        specs[b * n + a] = o.spec;
    }

    let want_offload = !cli.no_offload;
    let mtu = cli.mtu.unwrap_or(if want_offload { 1500 } else { 9000 });
    let mut tuns: Vec<OwnedFd> = Vec::new();
    let mut offload = sys::Offload::TsoUso;
    for h in &cli.hosts {
        let t = sys::open_tun_in_netns(&h.netns, &cli.tun_name, want_offload)?;
        if t.offload != offload {
            // Use the weakest level any device got (all must agree on the virtio header).
            offload = match (offload, t.offload) {
                (_, sys::Offload::None) | (sys::Offload::None, _) => sys::Offload::None,
                _ => sys::Offload::Tso,
            };
        }
        tuns.push(t.fd);
    }
    if want_offload && offload == sys::Offload::None {
        bail!("some TUN devices have offloads and some do not; use --no-offload");
    }
    if !cli.no_config {
        for h in &cli.hosts {
            sys::configure(&h.netns, &cli.tun_name, &h.addr.to_string(), h.prefix, mtu)
                .with_context(|| format!("configuring host {}", h.netns))?;
        }
    }
    for t in &tuns {
        sys::set_nonblocking(t.as_raw_fd())?;
    }
    let mut pipe = [0 as RawFd; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }

    let sh = Arc::new(Shared {
        hosts: cli.hosts.clone(),
        n,
        fds: tuns.iter().map(|t| t.as_raw_fd()).collect(),
        vnet: offload.vnet_hdr(),
        core: Mutex::new(Core {
            links: specs.iter().map(Link::from_spec).collect(),
            heap: BinaryHeap::new(),
        }),
        specs: specs.clone(),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
        stop_pipe: pipe,
        links: (0..n * n).map(|_| LinkStats::default()).collect(),
        tuns: (0..n).map(|_| TunStats::default()).collect(),
        pool: Pool {
            small: Mutex::new(Vec::new()),
            big: Mutex::new(Vec::new()),
        },
        start: Instant::now(),
    });
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut threads = Vec::new();
    {
        let sh = sh.clone();
        threads.push(
            std::thread::Builder::new()
                .name("scheduler".into())
                .spawn(move || scheduler(sh))?,
        );
    }
    for i in 0..n {
        let sh = sh.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("rx-{}", cli.hosts[i].netns))
                .spawn(move || reader(sh, i, seed))?,
        );
    }

    let differs = specs
        .iter()
        .enumerate()
        .any(|(i, s)| i / n != i % n && *s != base);
    eprintln!(
        "ferry-linkem: {n} hosts ({}), device {} mtu {mtu}, offload {}; profile {}: {base}{}",
        cli.hosts
            .iter()
            .map(|h| format!("{}={}", h.netns, h.addr))
            .collect::<Vec<_>>()
            .join(" "),
        cli.tun_name,
        offload.describe(),
        cli.profile,
        if differs {
            " (with --link overrides)"
        } else {
            ""
        }
    );
    if let Some(p) = &cli.ready_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }

    // Main thread: signals and the periodic stats file.
    let interval = Duration::from_secs_f64(cli.stats_interval.max(0.05));
    let mut next_file = Instant::now();
    loop {
        if cli.stats_file.is_some() && Instant::now() >= next_file {
            write_stats_file(&sh, &cli.stats_file);
            next_file = Instant::now() + interval;
        }
        let timeout = if cli.stats_file.is_some() {
            next_file.saturating_duration_since(Instant::now())
        } else {
            Duration::from_secs(3600)
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: sigtimedwait on a set blocked in every thread.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        match sig {
            libc::SIGUSR1 => {
                eprint!("{}", stats_text(&sh, "SIGUSR1"));
                write_stats_file(&sh, &cli.stats_file);
            }
            libc::SIGINT | libc::SIGTERM | libc::SIGHUP => break,
            _ => {}
        }
    }

    sh.stop.store(true, Relaxed);
    // SAFETY: writing one byte to our own pipe wakes readers blocked in poll.
    unsafe { libc::write(pipe[1], [1u8].as_ptr().cast(), 1) };
    {
        let _g = sh.core.lock().unwrap_or_else(|e| e.into_inner());
        sh.wake.notify_all();
    }
    for t in threads {
        let _ = t.join();
    }
    eprint!("{}", stats_text(&sh, "exit"));
    write_stats_file(&sh, &cli.stats_file);
    if let Some(p) = &cli.ready_file {
        let _ = std::fs::remove_file(p);
    }
    drop(tuns); // the TUN devices disappear with their fds
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-linkem: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_arguments() {
        let h = parse_host("ferry-h1=10.77.0.1/24").unwrap();
        assert_eq!(
            (h.netns.as_str(), h.addr, h.prefix),
            ("ferry-h1", Ipv4Addr::new(10, 77, 0, 1), 24)
        );
        assert_eq!(parse_host("x=10.0.0.9").unwrap().prefix, 24);
        assert!(parse_host("x").is_err());
        assert!(parse_host("=10.0.0.1").is_err());
        assert!(parse_host("../x=10.0.0.1").is_err());
        assert!(parse_host("x=10.0.0.300").is_err());
        assert!(parse_host("x=10.0.0.1/0").is_err());
    }

    #[test]
    fn link_overrides() {
        let o = parse_link_override("a,b=far").unwrap();
        assert_eq!((o.a.as_str(), o.b.as_str()), ("a", "b"));
        assert_eq!(o.spec, LinkSpec::profile("far").unwrap());
        let o = parse_link_override("a,b=rate=100mbit,rtt=80ms").unwrap();
        assert_eq!(o.spec.rate_bps, Some(100_000_000));
        assert_eq!(o.spec.rtt_ns, 80_000_000);
        assert!(parse_link_override("a=far").is_err());
        assert!(parse_link_override("a,b=moon").is_err());
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from([
            "ferry-linkem",
            "--host",
            "a=10.0.0.1",
            "--host",
            "b=10.0.0.2",
            "--profile",
            "wan",
            "--rate",
            "500mbit",
            "--loss",
            "1%",
        ])
        .unwrap();
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.rate.unwrap().0, Some(500_000_000));
        assert_eq!(c.loss, Some(0.01));
        assert!(
            Cli::try_parse_from(["ferry-linkem", "--host", "a=10.0.0.1", "--profile", "moon"])
                .is_err()
        );
    }

    #[test]
    fn pool_recycles_by_size() {
        let p = Pool {
            small: Mutex::new(Vec::new()),
            big: Mutex::new(Vec::new()),
        };
        let a = p.get(&[1, 2, 3]);
        assert_eq!(a, vec![1, 2, 3]);
        assert!(a.capacity() >= SMALL_BUF && a.capacity() < BIG_BUF);
        let b = p.get(&vec![7u8; 30000]);
        assert!(b.capacity() >= BIG_BUF);
        p.put(a);
        p.put(b);
        assert_eq!(p.small.lock().unwrap().len(), 1);
        assert_eq!(p.big.lock().unwrap().len(), 1);
        assert_eq!(
            p.get(&[9]),
            vec![9],
            "a recycled buffer holds only the new bytes"
        );
    }
}
