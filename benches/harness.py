#!/usr/bin/python3
"""Migration benchmark: ferry against QEMU's own migration on the same testbed link.

Run through benches/compare.sh (which builds everything and brings the testbed up);
this file does the runs. For every (dirty rate, method, repetition) it boots a fresh
guest on testbed host h1, migrates it to h2 and records total time, downtime, bytes on
the wire, rounds and CPU seconds. Every run ends with a page-by-page comparison of the
source's and the target's guest RAM while both are paused; a run whose RAM differs is a
failed run (not timed), and so is a run whose migration fails or whose guest fails its
own memory check afterwards. The harness exits non-zero if any run failed.

Method of measurement (the same for both tools):
  * The target is left paused after the switchover (ferry: `migrate --suspend`; QEMU:
    destination started with -S), so the RAM comparison sees the exact switchover state.
  * downtime = source QMP STOP -> target ready to run (ferry: committed and journaled;
    QEMU: incoming MIGRATION "completed") + the target's QMP cont -> RESUME, measured
    right after the comparison.
  * total = the migration request to completion as the tool reports it (ferry: from the
    StartMigration call, preflight included; QEMU: query-migrate total-time).
  * wire bytes = bytes through host h1's testbed interface (both directions) during the
    migration, read from the namespace's /proc/net/dev: headers, control traffic and
    ferry's preflight link probe included.
  * CPU seconds = utime+stime deltas of both ferryd processes and of both QEMU processes'
    non-vCPU threads (vCPU threads run the guest under TCG and would drown the figure).
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# method -> (codec, extra ferryctl migrate flags)
FERRY_METHODS = {
    "ferry-none": ("none", []),
    "ferry-lz4": ("lz4", []),
    "ferry-zstd1": ("zstd:1", []),
    "ferry-zstd3": ("zstd:3", []),
    "ferry-zstdf1": ("zstd:-1", []),
    # Without ferry's full-RAM fingerprint comparison in the pause: the protocol's floor.
    "ferry-lz4-noverify": ("lz4", ["--no-verify"]),
    "ferry-auto": ("auto", []),
    "ferry-zstd1-full": ("zstd:1", ["--verify", "full"]),
}
# perf sampling rate for --perf (per thread).
PERF_HZ = 499

QEMU_METHODS = {
    "qemu-plain": {},
    "qemu-multifd": {"multifd": True},
    "qemu-multifd-zstd": {"multifd": True, "compression": "zstd"},
    # What `virsh migrate --tls` and KubeVirt run: x509 credentials on both ends.
    "qemu-multifd-zstd-tls": {"multifd": True, "compression": "zstd", "tls": True},
}
ALL_METHODS = list(FERRY_METHODS) + list(QEMU_METHODS)


class RunFailed(Exception):
    """A run that must be reported as failed, with the reason."""


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def sh(args, timeout=600, check=True):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RunFailed(f"{' '.join(map(str, args[:6]))}... exited {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}")
    return r


# --------------------------------------------------------------------------- QMP


class Qmp:
    """Minimal QMP client: commands and timestamped events on one unix socket."""

    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise RunFailed(f"QMP socket {path} did not accept a connection")
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RunFailed("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            m = self._read()
            if "event" in m:
                self.events.append(m)
            elif "error" in m:
                raise RunFailed(f"QMP {name}: {m['error'].get('desc')}")
            elif "return" in m:
                return m["return"]

    def wait_event(self, pred, timeout):
        """Returns the first (already received or new) event matching pred."""
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if pred(e):
                    return self.events.pop(i)
            left = deadline - time.time()
            if left <= 0:
                raise RunFailed("timed out waiting for a QMP event")
            self.sock.settimeout(left)
            try:
                m = self._read()
            except socket.timeout:
                raise RunFailed("timed out waiting for a QMP event")
            finally:
                self.sock.settimeout(None)
            if "event" in m:
                self.events.append(m)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def ev_time(e):
    t = e["timestamp"]
    return t["seconds"] + t["microseconds"] / 1e6


def is_migration(status):
    return lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in status


# --------------------------------------------------------------------------- measurements


def netdev_bytes(pid):
    """rx+tx bytes of every non-loopback interface in pid's network namespace."""
    total = 0
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f.readlines()[2:]:
            name, data = line.split(":", 1)
            if name.strip() == "lo":
                continue
            cols = data.split()
            total += int(cols[0]) + int(cols[8])
    return total


def stat_ticks(path):
    """utime+stime clock ticks from a /proc .../stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def proc_cpu(pid):
    """utime+stime seconds of a process, threads that have exited included."""
    try:
        return stat_ticks(f"/proc/{pid}/stat") / CLK_TCK
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def proc_cpu_split(pid):
    """(seconds outside the vCPU threads, seconds in them) of a process.

    The process-wide figure of /proc/PID/stat counts threads that have exited (QEMU's
    multifd threads end with the migration); summing /proc/PID/task/* would drop them."""
    try:
        total = stat_ticks(f"/proc/{pid}/stat")
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    vcpu = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            if comm.startswith("CPU ") and ("/TCG" in comm or "/KVM" in comm):
                vcpu += stat_ticks(f"/proc/{pid}/task/{tid}/stat")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return (total - vcpu) / CLK_TCK, vcpu / CLK_TCK


class QemuCpuSampler(threading.Thread):
    """Samples the CPU time of the QEMU processes found by `find` every 50 ms, apart for
    the vCPU threads and the rest, so a process that exits (ferry's source after commit)
    still counts up to its end. Also times its own window, for the machine's busy share."""

    def __init__(self, find):
        super().__init__(daemon=True)
        self.find = find
        self.first = {}
        self.last = {}
        self.started = time.monotonic()
        self.host0 = host_cpu_ticks()
        self.host_busy = None
        self.stop_flag = threading.Event()

    def sample(self):
        for pid in self.find():
            c = proc_cpu_split(pid)
            if c is None:
                continue
            prev = self.last.get(pid)
            if prev is not None and c[1] < prev[1]:
                # A QEMU exiting: its vCPU threads left the task list, their time stays in
                # the process total. Keep their last count (without it, one run of s25-far
                # read -5.73 vCPU-s and charged the difference to QEMU's other threads).
                c = (c[0] + c[1] - prev[1], prev[1])
            self.first.setdefault(pid, c)
            self.last[pid] = c

    def run(self):
        while not self.stop_flag.is_set():
            self.sample()
            time.sleep(0.05)

    def finish(self):
        """(QEMU non-vCPU seconds, vCPU seconds, seconds the window lasted)."""
        self.sample()
        self.stop_flag.set()
        self.join()
        host1 = host_cpu_ticks()
        self.host_busy = (host1[0] - self.host0[0]) / max(1, host1[1] - self.host0[1])
        other = sum(self.last[p][0] - self.first[p][0] for p in self.last)
        vcpu = sum(self.last[p][1] - self.first[p][1] for p in self.last)
        return other, vcpu, time.monotonic() - self.started


def host_cpu_ticks():
    """(busy, all) clock ticks of the whole host from /proc/stat: everything that ran,
    the testbed's link emulator and the kernel's network path included."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal; guest time is inside user/nice.
        v = [int(x) for x in f.readline().split()[1:9]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def machine_busy(cpu_s, window_s):
    """Share of the machine's cores the measured processes kept busy over the window."""
    cores = os.cpu_count() or 1
    return cpu_s / (cores * window_s) if window_s > 0 else None


def qemu_pids_under(path_fragment):
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"qemu-system" in cmd and path_fragment.encode() in cmd:
            pids.append(int(d))
    return pids


def compare_ram(a, b):
    """Page-by-page comparison of two RAM files: (differing pages, non-zero pages of b)."""
    if os.path.getsize(a) != os.path.getsize(b):
        raise RunFailed(f"RAM sizes differ: {a} {os.path.getsize(a)} vs {b} {os.path.getsize(b)}")
    differ = nonzero = 0
    chunk = 1 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if not ca:
                break
            equal = ca == cb
            mv_a, mv_b = memoryview(ca), memoryview(cb)
            for off in range(0, len(cb), PAGE):
                pb = mv_b[off:off + PAGE]
                if pb != ZERO_PAGE:
                    nonzero += 1
                if not equal and mv_a[off:off + PAGE] != pb:
                    differ += 1
    return differ, nonzero


# --------------------------------------------------------------------------- the testbed


class Testbed:
    def __init__(self, env_file, bin_dir, root):
        self.env = {}
        with open(env_file) as f:
            for line in f:
                if "=" in line and not line.startswith("#"):
                    k, v = line.strip().split("=", 1)
                    self.env[k] = v.strip("'\"")
        self.bin = bin_dir
        self.root = root
        self.ns = [self.env["FERRY_TB_H1_NETNS"], self.env["FERRY_TB_H2_NETNS"]]
        self.addr = [self.env["FERRY_TB_H1_ADDR"], self.env["FERRY_TB_H2_ADDR"]]
        self.grpc = [f"{a}:7701" for a in self.addr]
        self.ferryd = [int(self.env["FERRY_TB_H1_FERRYD_PID"]), int(self.env["FERRY_TB_H2_FERRYD_PID"])]
        self.pki = self.env["FERRY_TB_PKI_DIR"]
        prefix = self.ns[0].rsplit("-", 1)[0]
        self.ram_root = f"/dev/shm/{prefix}-tb"

    def ctl(self, host, *args, timeout=600, check=True):
        return sh(["ip", "netns", "exec", self.ns[host], f"{self.bin}/ferryctl", "--agent", self.grpc[host],
                   "--pki-dir", self.pki, "--identity", "operator", *args], timeout=timeout, check=check)

    def ctl_json(self, host, *args, **kw):
        out = self.ctl(host, "--json", *args, **kw).stdout
        return json.loads(out)

    def guest(self, *args, timeout=300):
        return sh([f"{self.bin}/ferry-guest", *args], timeout=timeout + 10)


def vm_spec_toml(name, args, root):
    return f'''name = "{name}"
memory_mib = {args.guest_mib}
kernel = "{root}/build/guest/vmlinuz"
initrd = "{root}/build/guest/initramfs.cpio.gz"
cmdline = "console=ttyS0 panic=-1 quiet ferry.mem_mib={args.workload_mib} ferry.dirty_mibps={{dirty}} ferry.mix={args.mix} ferry.seed=1"
'''


def guest_check(tb, console_sock):
    r = tb.guest("cmd", console_sock, "check", "--timeout", "60", timeout=60)
    line = r.stdout.strip()
    if "ok" not in line.split():
        raise RunFailed(f"guest memory check after migration: {line}")
    return line


# --------------------------------------------------------------------------- ferry runs


def run_ferry(tb, args, method, dirty, idx, workdir):
    codec, extra = method
    name = f"b{idx}"
    spec = os.path.join(workdir, f"{name}.toml")
    with open(spec, "w") as f:
        f.write(vm_spec_toml(name, args, tb.root).replace("{dirty}", str(dirty)))
    tb.ctl(0, "vm", "define", spec)
    try:
        info = tb.ctl_json(0, "vm", "start", name)
        info = tb.ctl_json(0, "vm", "show", name)
        tb.guest("wait-ready", info["console_log"], "--timeout", "300", timeout=300)
        time.sleep(args.settle)
        sampler = QemuCpuSampler(lambda: qemu_pids_under(tb.ram_root + "/h"))
        sampler.start()
        cpu0 = [proc_cpu(p) for p in tb.ferryd]
        net0 = netdev_bytes(tb.ferryd[0])
        perf = None
        if args.perf:
            perf_data = os.path.join(args.out, f"perf-{name}.data")
            # DWARF unwinding: the release build keeps line tables but no frame pointers.
            perf = subprocess.Popen(["perf", "record", "-q", "-F", str(PERF_HZ), "--call-graph", "dwarf,16384",
                                     "-p", ",".join(str(p) for p in tb.ferryd), "-o", perf_data],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        r = tb.ctl(0, "--json", "migrate", name, "--to", tb.grpc[1], "--compress", codec, "--suspend", "--force", *extra, *args.ferry_flags.split(),
                   timeout=args.migration_timeout + 60, check=False)
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=120)
        net1 = netdev_bytes(tb.ferryd[0])
        cpu1 = [proc_cpu(p) for p in tb.ferryd]
        agents_cpu = sum(b - a for a, b in zip(cpu0, cpu1))
        qemu_cpu, vcpu_cpu, window_s = sampler.finish()
        lines = [json.loads(l) for l in r.stdout.splitlines() if l.strip().startswith("{")]
        if not lines:
            raise RunFailed(f"ferryctl migrate printed no status: {r.stderr.strip()[-400:]}")
        st = lines[-1]
        if st.get("phase") != "COMPLETED":
            raise RunFailed(f"migration {st.get('phase')}: {st.get('error') or r.stderr.strip()[-400:]}")
        s = st.get("stats") or {}
        if perf:
            sh([sys.executable, os.path.join(tb.root, "benches", "profile.py"), perf_data,
                "--source-pid", str(tb.ferryd[0]), "--target-pid", str(tb.ferryd[1]),
                "--page-bytes", str(s.get("page_bytes") or 1), "--freq", str(PERF_HZ),
                "--out", os.path.join(args.out, "profiles"), "--name", f"{name}-{codec.replace(':', '')}-dirty{dirty:g}",
                "--title", f"ferry agents (source | target), {codec}, {args.profile}, dirty {dirty:g} MiB/s"],
               timeout=600)
            os.unlink(perf_data)
        target = tb.ctl_json(1, "vm", "show", name)
        if str(target.get("state")).lower() != "paused":
            raise RunFailed(f"target VM is {target.get('state')}, expected paused")
        src_ram = os.path.join(tb.ram_root, "h1", f"{name}.after-migration")
        differ, nonzero = compare_ram(src_ram, target["ram_file"])
        os.unlink(src_ram)
        if differ:
            raise RunFailed(f"RAM differs in {differ} pages between source and target")
        resumed = tb.ctl_json(1, "vm", "resume", name)
        check = guest_check(tb, target["console_socket"])
        bd = s.get("downtime_breakdown") or {}
        ready_ms = bd.get("commit_us", 0) / 1000.0
        return {
            "total_ms": (st["finished_unix_ms"] - st["started_unix_ms"]),
            "migrate_ms": s.get("elapsed_ms"),
            "preflight_ms": s.get("preflight_ms"),
            "downtime_ms": ready_ms + resumed.get("resume_latency_us", 0) / 1000.0,
            "stop_to_ready_ms": ready_ms,
            "resume_ms": resumed.get("resume_latency_us", 0) / 1000.0,
            "wire_bytes": net1 - net0,
            "stream_bytes": s.get("wire_bytes"),
            "page_bytes": s.get("page_bytes"),
            "ratio": s.get("compression_ratio"),
            "rounds": s.get("rounds"),
            "pages_skipped": s.get("pages_skipped"),
            "nonzero_ram_bytes": nonzero * PAGE,
            "cpu_agents_s": agents_cpu,
            "cpu_source_agent_s": cpu1[0] - cpu0[0],
            "cpu_target_agent_s": cpu1[1] - cpu0[1],
            "cpu_qemu_s": qemu_cpu,
            "cpu_vcpu_s": vcpu_cpu,
            "machine_busy": machine_busy(agents_cpu + qemu_cpu + vcpu_cpu, window_s),
            "host_busy": sampler.host_busy,
            "policy": s.get("policy_applied", ""),
            "guest_check": check,
            "downtime_breakdown_us": s.get("downtime_breakdown"),
            # What ferry's preflight predicted for this very migration (its total excludes
            # the preflight itself: compare with migrate_ms).
            "predicted_total_ms": (s.get("prediction") or {}).get("predicted_total_ms"),
            "predicted_downtime_ms": (s.get("prediction") or {}).get("predicted_downtime_ms"),
            # What the prediction was made from, and the rounds as they went.
            "prediction": s.get("prediction"),
            "round_history": s.get("round_history"),
        }
    finally:
        for host in (1, 0):
            tb.ctl(host, "vm", "stop", name, "--force", check=False, timeout=60)
            tb.ctl(host, "vm", "undefine", name, check=False, timeout=60)
        try:
            os.unlink(os.path.join(tb.ram_root, "h1", f"{name}.after-migration"))
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- QEMU runs


class NativeQemu:
    def __init__(self, tb, host, spec, name, incoming):
        self.run_dir = os.path.join(tb.ram_root, "native", name)
        os.makedirs(self.run_dir, exist_ok=True)
        self.ram = os.path.join(self.run_dir, "guest.ram")
        argv = json.loads(sh([f"{tb.bin}/ferry-guest", "qemu-argv", spec, "--ram", self.ram, "--run-dir", self.run_dir,
                              "--accel", "tcg"] + (["--incoming"] if incoming else [])).stdout)
        self.stderr = open(os.path.join(self.run_dir, "qemu.stderr"), "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", tb.ns[host], "qemu-system-x86_64", *argv],
                                     stdout=self.stderr, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.qmp = Qmp(os.path.join(self.run_dir, "qmp.sock"))
        self.console_sock = os.path.join(self.run_dir, "console.sock")
        self.console_log = os.path.join(self.run_dir, "console.log")

    def close(self):
        self.qmp.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.stderr.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def qemu_tls_creds(out, dst_addr):
    """x509 credentials in the layout QEMU's tls-creds-x509 reads (ca-cert.pem,
    server-cert.pem/-key.pem, client-cert.pem/-key.pem): a CA, a server certificate for
    the target (DNS ferry-bench-dst and its address) and a client one for the source.
    ECDSA P-256, like ferry's own mesh certificates. Made once per benchmark run."""
    d = os.path.join(out, "qemu-tls")
    if os.path.exists(os.path.join(d, "client-cert.pem")):
        return d
    os.makedirs(d, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh(["openssl", "req", "-x509", *ec, "-keyout", f"{d}/ca-key.pem", "-out", f"{d}/ca-cert.pem", "-days", "7",
        "-subj", "/CN=ferry-bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    for role, usage, san in (("server", "serverAuth", f"DNS:ferry-bench-dst,IP:{dst_addr}"),
                             ("client", "clientAuth", "DNS:ferry-bench-src")):
        ext = os.path.join(d, f"{role}.ext")
        with open(ext, "w") as f:
            f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={usage}\nsubjectAltName={san}\n")
        sh(["openssl", "req", *ec, "-keyout", f"{d}/{role}-key.pem", "-out", f"{d}/{role}.csr",
            "-subj", f"/CN=ferry-bench-{role}"])
        sh(["openssl", "x509", "-req", "-in", f"{d}/{role}.csr", "-CA", f"{d}/ca-cert.pem", "-CAkey", f"{d}/ca-key.pem",
            "-CAcreateserial", "-out", f"{d}/{role}-cert.pem", "-days", "7", "-extfile", ext])
    return d


def run_qemu(tb, args, mode, dirty, idx, workdir):
    opts = QEMU_METHODS[mode]
    name = f"q{idx}"
    spec = os.path.join(workdir, f"{name}.toml")
    with open(spec, "w") as f:
        f.write(vm_spec_toml(name, args, tb.root).replace("{dirty}", str(dirty)))
    src = dst = None
    try:
        src = NativeQemu(tb, 0, spec, name + "-src", incoming=False)
        dst = NativeQemu(tb, 1, spec, name + "-dst", incoming=True)
        tb.guest("wait-ready", src.console_log, "--timeout", "300", timeout=300)
        time.sleep(args.settle)
        caps = [{"capability": "events", "state": True}]
        if opts.get("multifd"):
            caps.append({"capability": "multifd", "state": True})
        params = {}
        if opts.get("multifd"):
            params["multifd-channels"] = 2
        if opts.get("compression"):
            params["multifd-compression"] = opts["compression"]
        if opts.get("tls"):
            creds = qemu_tls_creds(args.out, tb.addr[1])
            for q, endpoint in ((src.qmp, "client"), (dst.qmp, "server")):
                q.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds,
                                       "endpoint": endpoint, "verify-peer": True})
            params["tls-creds"] = "tls0"
        for q in (src.qmp, dst.qmp):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            if params:
                q.cmd("migrate-set-parameters", **params)
        if opts.get("tls"):
            src.qmp.cmd("migrate-set-parameters", **{"tls-hostname": "ferry-bench-dst"})
        # What `virsh migrate --live` does: no bandwidth cap, QEMU's default downtime limit.
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        port = 7800 + idx % 100
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:{tb.addr[1]}:{port}")
        sampler = QemuCpuSampler(lambda: [p for p in (src.proc.pid, dst.proc.pid)])
        # `ip netns exec` execs QEMU in place, so Popen's pid is QEMU's.
        sampler.start()
        net0 = netdev_bytes(tb.ferryd[0])
        src.qmp.cmd("migrate", uri=f"tcp:{tb.addr[1]}:{port}")
        ev = src.qmp.wait_event(is_migration(("completed", "failed", "cancelled")), args.migration_timeout)
        if ev["data"]["status"] != "completed":
            info = src.qmp.cmd("query-migrate")
            raise RunFailed(f"QEMU migration {ev['data']['status']}: {info.get('error-desc', '')}")
        done = dst.qmp.wait_event(is_migration(("completed", "failed")), 60)
        if done["data"]["status"] != "completed":
            raise RunFailed("QEMU incoming migration failed on the target")
        net1 = netdev_bytes(tb.ferryd[0])
        qemu_cpu, vcpu_cpu, window_s = sampler.finish()
        stop = src.qmp.wait_event(lambda e: e["event"] == "STOP", 5)
        info = src.qmp.cmd("query-migrate")
        differ, nonzero = compare_ram(src.ram, dst.ram)
        if differ:
            raise RunFailed(f"RAM differs in {differ} pages between source and target")
        asked = time.time()
        dst.qmp.cmd("cont")
        resume = dst.qmp.wait_event(lambda e: e["event"] == "RESUME", 10)
        resume_ms = max(0.0, (ev_time(resume) - asked) * 1000)
        ready_ms = (ev_time(done) - ev_time(stop)) * 1000
        check = guest_check(tb, dst.console_sock)
        ram = info.get("ram", {})
        return {
            "total_ms": info.get("total-time"),
            "migrate_ms": info.get("total-time"),
            "preflight_ms": 0,
            "downtime_ms": ready_ms + resume_ms,
            "stop_to_ready_ms": ready_ms,
            "resume_ms": resume_ms,
            "qemu_reported_downtime_ms": info.get("downtime"),
            "wire_bytes": net1 - net0,
            "stream_bytes": ram.get("transferred"),
            "page_bytes": ram.get("normal-bytes"),
            "ratio": None,
            "rounds": ram.get("dirty-sync-count"),
            "nonzero_ram_bytes": nonzero * PAGE,
            "cpu_agents_s": 0.0,
            "cpu_qemu_s": qemu_cpu,
            "cpu_vcpu_s": vcpu_cpu,
            "machine_busy": machine_busy(qemu_cpu + vcpu_cpu, window_s),
            "host_busy": sampler.host_busy,
            "policy": "",
            "guest_check": check,
        }
    finally:
        for q in (dst, src):
            if q:
                q.close()


# --------------------------------------------------------------------------- report


def summarize(runs, key):
    vals = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    if not vals:
        return None
    return min(vals), statistics.median(vals)


def med(runs, key, scale=1.0):
    p = summarize(runs, key)
    return "–" if p is None else f"{p[1] * scale:.0f}"


def fmt_pair(p, scale=1.0, digits=0):
    if p is None:
        return "–"
    return f"{p[0] * scale:.{digits}f} / {p[1] * scale:.{digits}f}"


def build_table(results, args):
    rows = []
    head = ("| dirty MiB/s | method | ok runs | total ms (min/median) | downtime ms | wire MiB | "
            "wire / touched RAM | ratio | rounds | CPU s agents | CPU s QEMU (non-vCPU) | CPU s vCPU | busy %: agents+QEMU / host | predicted / actual migrate ms | failures |")
    rows.append(head)
    rows.append("|" + "---|" * 15)
    for dirty in args.dirty:
        for m in args.methods:
            runs = [r for r in results if r["dirty"] == dirty and r["method"] == m]
            if not runs:
                continue
            ok = [r for r in runs if r["ok"]]
            fails = "; ".join(sorted({r["error"] for r in runs if not r["ok"]}))
            touched = [r["wire_bytes"] / r["nonzero_ram_bytes"] for r in ok if r.get("nonzero_ram_bytes")]
            ratio = summarize(runs, "ratio")
            pred, act = summarize(runs, "predicted_total_ms"), summarize(runs, "migrate_ms")
            pred_col = f"{pred[1]:.0f} / {act[1]:.0f}" if pred and act and m in FERRY_METHODS else "–"
            rows.append(
                f"| {dirty:g} | {m} | {len(ok)}/{len(runs)} | {fmt_pair(summarize(runs, 'total_ms'))} | "
                f"{fmt_pair(summarize(runs, 'downtime_ms'), digits=1)} | "
                f"{fmt_pair(summarize(runs, 'wire_bytes'), 1 / 2**20)} | "
                f"{(statistics.median(touched) if touched else float('nan')):.2f} | "
                f"{'–' if ratio is None else f'{ratio[1]:.2f}'} | {fmt_pair(summarize(runs, 'rounds'))} | "
                f"{fmt_pair(summarize(runs, 'cpu_agents_s'), digits=2)} | {fmt_pair(summarize(runs, 'cpu_qemu_s'), digits=2)} | "
                f"{fmt_pair(summarize(runs, 'cpu_vcpu_s'), digits=2)} | "
                f"{med(runs, 'machine_busy', 100)} / {med(runs, 'host_busy', 100)} | "
                f"{pred_col} | {fails[:200]} |")
    return "\n".join(rows) + "\n"


def plot(results, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot (apt-get install python3-matplotlib)")
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    width = 0.8 / max(1, len(args.dirty))
    for j, dirty in enumerate(args.dirty):
        for ax, key, scale, title in ((axes[0], "total_ms", 1e-3, "total time (s)"),
                                      (axes[1], "downtime_ms", 1.0, "downtime (ms)"),
                                      (axes[2], "wire_bytes", 1 / 2**20, "bytes on the wire (MiB)")):
            meds, mins = [], []
            for m in args.methods:
                p = summarize([r for r in results if r["dirty"] == dirty and r["method"] == m], key)
                meds.append(p[1] * scale if p else 0)
                mins.append(p[0] * scale if p else 0)
            xs = [i + j * width for i in range(len(args.methods))]
            ax.bar(xs, meds, width, label=f"{dirty:g} MiB/s dirty (median)")
            ax.scatter(xs, mins, marker="_", color="black", s=80, zorder=3)
            ax.set_title(title)
            ax.set_xticks([i + width * (len(args.dirty) - 1) / 2 for i in range(len(args.methods))])
            ax.set_xticklabels(args.methods, rotation=35, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.guest_mib} MiB guest ({args.workload_mib} MiB {args.mix} workload), link '{args.profile}', "
                 f"{args.repeat} runs each; bars median, ticks min; failed runs not plotted")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed-env", required=True)
    ap.add_argument("--bin", required=True, help="directory with ferryctl and ferry-guest")
    ap.add_argument("--root", required=True, help="repository root (guest artifacts in build/guest)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--profile", default="wan")
    ap.add_argument("--guest-mib", type=int, default=1024)
    ap.add_argument("--workload-mib", type=int, default=512)
    ap.add_argument("--mix", default="realistic", choices=["realistic", "zero", "text", "random"])
    ap.add_argument("--dirty", default="0,50", help="comma-separated dirty rates in MiB/s")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between guest ready and migration")
    ap.add_argument("--migration-timeout", type=float, default=300.0)
    ap.add_argument("--perf", action="store_true",
                    help="perf record both agents during each ferry run; flame graph and stage table in OUT/profiles "
                         "(the recording costs CPU: do not compare these runs' times with others)")
    ap.add_argument("--ferry-flags", default="", help="extra `ferryctl migrate` flags for every ferry run, e.g. '--on-stall abort'")
    args = ap.parse_args()
    args.dirty = [float(d) for d in args.dirty.split(",") if d]
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in ALL_METHODS:
            ap.error(f"unknown method {m}; known: {', '.join(ALL_METHODS)}")
    os.makedirs(args.out, exist_ok=True)
    tb = Testbed(args.testbed_env, args.bin, args.root)
    workdir = os.path.join(args.out, "specs")
    os.makedirs(workdir, exist_ok=True)

    results = []
    idx = 0
    # Interleave methods inside each repetition so slow drift of the machine hits all alike.
    for rep in range(args.repeat):
        for dirty in args.dirty:
            for m in args.methods:
                idx += 1
                log(f"run {idx}: {m}, dirty {dirty:g} MiB/s, repetition {rep + 1}/{args.repeat}")
                rec = {"method": m, "dirty": dirty, "rep": rep + 1, "ok": False, "error": ""}
                try:
                    if m in FERRY_METHODS:
                        rec.update(run_ferry(tb, args, FERRY_METHODS[m], dirty, idx, workdir))
                    else:
                        rec.update(run_qemu(tb, args, m, dirty, idx, workdir))
                    rec["ok"] = True
                    log(f"  total {rec['total_ms']} ms, downtime {rec['downtime_ms']:.1f} ms, "
                        f"wire {rec['wire_bytes'] / 2**20:.1f} MiB, rounds {rec['rounds']}")
                except (RunFailed, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
                    rec["error"] = str(e)
                    log(f"  FAILED: {e}")
                results.append(rec)
                with open(os.path.join(args.out, "results.json"), "w") as f:
                    json.dump({"args": {k: v for k, v in vars(args).items()}, "runs": results}, f, indent=1)

    table = build_table(results, args)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plotted = plot(results, args, os.path.join(args.out, "plot.png"))
    print()
    print(table)
    failed = [r for r in results if not r["ok"]]
    log(f"results in {args.out}/results.json, table.md{', plot.png' if plotted else ''}")
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(results)} runs failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['method']} dirty {r['dirty']:g} rep {r['rep']}: {r['error']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
