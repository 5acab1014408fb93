#!/usr/bin/env python3
"""Pool benchmark: the Hyperpool pool daemon under load, and QEMU's density for the same guest,
in one run.

Starts `hyperpool serve` on a fresh state directory and measures, with idle probe guests
(`probe=idle`: prints `PROBE idle ready`, then halts with interrupts on), 128 MiB each:
  creation rate   N VMs created and started through the pool API (POST /v1/vms?start=true from
                  concurrent clients) per second, from the first request to the last guest's
                  first serial output in its console.log; repeated --rate-runs times, after
                  --tiny-runs with tiny-idle.elf (a guest whose boot costs next to nothing even
                  on PVM hosts, where the probe's ring-0 start-up is emulated: the pool's own
                  rate); with the CPU each probe VM cost (its vCPU, the rest of its VMM, the
                  daemon, this client, all on the same cores)
  API latency     p50/p99 of GET /v1/vms/<name> and GET /v1/pool with --concurrency requests in
                  flight at once (one connection each) while the VMs run
  memory per VM   the VMM's PSS (/proc/PID/smaps_rollup) minus the guest pages it holds
                  (`resident_guest_bytes` from GET /v1/vms/<name>), per VM; the daemon's own
                  PSS per VM; and the drop in MemAvailable per VM (all host memory: guest pages,
                  KVM and page-table memory, cgroups)
  density         VMs started until --cap or until MemAvailable falls below --min-available-gib;
                  then the same with QEMU (`-M microvm`, the same probe.elf and command line),
                  each QEMU its own process as boot.py runs it, until --qemu-cap or the same
                  floor; per-VM memory (PSS, MemAvailable drop, kernel-side growth) and the CPU
                  the idle VMs use
and prints min / median / max where there are repeated samples, with QEMU / Hyperpool ratios.

Usage: benches/pool.py [--hyperpool PATH] [--vms N] [--rate-runs N] [--clients N]
                       [--concurrency N] [--cap N] [--qemu-cap N] [--min-available-gib G]
Needs root (cgroups, /proc/PID/smaps_rollup of the VMMs). Everything it starts is stopped and
removed at the end, also on Ctrl-C.
"""

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MEMORY_MIB = 128
CMDLINE = "probe=idle"
# The probe's first line (and its idle line), and tiny-idle.elf's only line.
FIRST_OUTPUT = (b"hyperpool-probe: start", b"PROBE idle ready", b"hyperpool-tiny")


# ---------------------------------------------------------------- pool API client (Unix socket)

class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class Api:
    """Blocking client, one keep-alive connection per thread."""

    def __init__(self, path, timeout=120):
        self.path = path
        self.timeout = timeout
        self.local = threading.local()

    def request(self, method, url, body=None):
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = UnixHTTPConnection(self.path, self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                conn.request(method, url, body=None if body is None else json.dumps(body),
                             headers=headers)
                r = conn.getresponse()
                data = r.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        if r.status == 204 or not data:
            return r.status, None
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data.decode(errors="replace")

    def ok(self, method, url, body=None):
        status, reply = self.request(method, url, body)
        if status >= 300:
            raise RuntimeError(f"{method} {url}: {status} {reply}")
        return reply


# ---------------------------------------------------------------- host figures

def meminfo_kib(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/meminfo")


def mem_available_mib():
    return meminfo_kib("MemAvailable") / 1024


# Where host memory goes besides the processes' own pages (KiB fields of /proc/meminfo).
BREAKDOWN = ("AnonPages", "PageTables", "SecPageTables", "KernelStack", "Slab", "SUnreclaim",
             "Percpu", "Shmem")


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0])
    return out


def breakdown(before, after, count):
    """Per-VM growth of the BREAKDOWN fields, in KiB, as one line."""
    parts = [f"{k} {(after[k] - before[k]) / count:.0f}" for k in BREAKDOWN if k in after]
    return ", ".join(parts) + " KiB/VM"


def cpu_ms(pid):
    """CPU time of a process (all its threads) so far, ms; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def threads_ms(pid):
    """CPU time so far of the process's vCPU threads and of its other threads, ms."""
    vcpu = other = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                ms = int(f.read().split()[0]) / 1e6
        except (OSError, ValueError, IndexError):
            continue
        if name.startswith("vcpu"):
            vcpu += ms
        else:
            other += ms
    return vcpu, other


def idle_cpu(pids, seconds=5.0):
    """CPU the processes use while their guests idle: ms per second per process."""
    before = sum(cpu_ms(p) for p in pids)
    time.sleep(seconds)
    return (sum(cpu_ms(p) for p in pids) - before) / seconds / max(1, len(pids))


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def load():
    return f"load average {os.getloadavg()[0]:.2f}"


def summary(values):
    return min(values), statistics.median(values), max(values)


def fmt3(values, prec=2):
    lo, mid, hi = summary(values)
    return f"{lo:.{prec}f} / {mid:.{prec}f} / {hi:.{prec}f}"


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# ---------------------------------------------------------------- the Hyperpool side

class Pool:
    def __init__(self, hp, workdir, clients):
        self.hp = hp
        self.socket = os.path.join(workdir, "pool.sock")
        self.state = os.path.join(workdir, "state")
        self.log = os.path.join(workdir, "daemon.log")
        self.clients = clients
        self.api = Api(self.socket)
        # Unique names: VM cgroups are host-wide (hyperpool/<name>).
        self.prefix = f"pb{os.getpid()}-"
        self.next = 0
        self.names = []  # VMs that exist in the daemon
        self.daemon = None

    def start(self):
        env = dict(os.environ)
        with open(self.log, "ab") as log:
            # Its own session: a Ctrl-C on the terminal must leave it up for the clean-up.
            self.daemon = subprocess.Popen(
                [self.hp, "serve", "--socket", self.socket, "--state-dir", self.state,
                 "--cpu-overcommit", "10000", "--memory-overcommit", "100"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.api.ok("GET", "/v1/pool")
                return
            except (OSError, RuntimeError, http.client.HTTPException):
                if self.daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not come up; see {self.log}")
                time.sleep(0.05)

    def console_log(self, name):
        return os.path.join(self.state, "vms", name, "console.log")

    def create(self, count, kernel=None):
        """Creates and starts `count` VMs from `clients` concurrent requests (the probe, or
        `kernel`); returns (seconds from the first request to the last first output,
        create-request latencies in ms, names).

        One asyncio loop on one thread makes the requests (a connection each): this client
        shares the cores with what it measures, and 32 blocking threads spent more CPU per VM
        on switching than on HTTP."""
        names = [f"{self.prefix}{self.next + i}" for i in range(count)]
        self.next += count
        latencies, errors, seen = [], [], {}
        t0 = time.perf_counter()
        asyncio.run(self._create_all(names, kernel, latencies, errors, seen))
        if errors:
            raise RuntimeError(f"{len(errors)} of {count} creations failed, e.g. {errors[0]}")
        return max(seen.values()) - t0, latencies, names

    async def _create_all(self, names, kernel, latencies, errors, seen, timeout=120):
        gate = asyncio.Semaphore(self.clients)
        started = []  # names whose start request returned 201, in order

        async def one(name):
            spec = {"name": name, "memory_mib": MEMORY_MIB, "cmdline": CMDLINE}
            if kernel:
                spec["kernel"] = kernel
            body = json.dumps(spec).encode()
            head = ("POST /v1/vms?start=true HTTP/1.1\r\nHost: localhost\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            async with gate:
                t = time.perf_counter()
                reader, writer = await asyncio.open_unix_connection(self.socket)
                writer.write(head + body)
                reply = await reader.read()
                writer.close()
                latencies.append((time.perf_counter() - t) * 1e3)
            # Also after a failure: a failed start leaves a created VM (removing it is harmless
            # if it does not exist).
            self.names.append(name)
            status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.1 ") else b"?"
            if status != b"201":
                errors.append(f"{name}: {status.decode()} {reply[-300:].decode(errors='replace')}")
            else:
                started.append(name)

        requests = asyncio.gather(*(one(n) for n in names))
        # A VM counts from the later of its reply and its first output (a lower bound on the
        # rate); only VMs whose start returned are looked at, a few stat calls each.
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and not errors:
            for name in [n for n in started if n in pending]:
                if self.printed(name):
                    seen[name] = time.perf_counter()
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} VMs printed nothing within {timeout} s")
            await asyncio.sleep(0.005)
        await requests

    def printed(self, name):
        try:
            if os.stat(self.console_log(name)).st_size == 0:
                return False
            with open(self.console_log(name), "rb") as f:
                head = f.read(256)
        except OSError:
            return False
        return any(m in head for m in FIRST_OUTPUT)

    def inspect(self, name):
        return self.api.ok("GET", f"/v1/vms/{name}")

    def memory(self, names):
        """Per VM: (VMM PSS minus resident guest pages, guest pages) in MiB."""
        own, guest = [], []
        for name in names:
            d = self.inspect(name)
            if d.get("status") != "running" or not d.get("live"):
                raise RuntimeError(f"{name} is {d.get('status')}, not running")
            resident = d["live"]["resident_guest_bytes"] / 1024
            own.append((pss_kib(d["pid"]) - resident) / 1024)
            guest.append(resident / 1024)
        return own, guest

    def pids(self):
        out = []
        for r in self.api.ok("GET", "/v1/vms"):
            if r.get("pid"):
                out.append(r["pid"])
        return out

    def remove_all(self):
        """Kills and deletes every VM this benchmark made (concurrently)."""
        names, self.names = list(self.names), []

        def one(name):
            self.api.request("POST", f"/v1/vms/{name}/kill")
            status, reply = self.api.request("DELETE", f"/v1/vms/{name}")
            if status not in (204, 404):
                print(f"warning: deleting {name}: {status} {reply}", file=sys.stderr)

        with concurrent.futures.ThreadPoolExecutor(self.clients) as pool:
            list(pool.map(one, names))

    def stop(self):
        if self.daemon is None:
            return
        try:
            self.remove_all()
        except Exception as e:  # the backstop below still runs
            print(f"warning: removing VMs through the API: {e}", file=sys.stderr)
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
        self.daemon = None
        # Backstop: VMMs outlive the daemon by design, so kill whatever still serves a socket
        # in our state directory, and drop cgroups left with our prefix.
        marker = os.path.join(self.state, "vms").encode()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)
        controllers = ["/sys/fs/cgroup"]
        for c in os.listdir("/sys/fs/cgroup"):
            controllers.append(os.path.join("/sys/fs/cgroup", c))
        for ctrl in controllers:
            base = os.path.join(ctrl, "hyperpool")
            if not os.path.isdir(base):
                continue
            for d in os.listdir(base):
                if d.startswith(self.prefix):
                    try:
                        os.rmdir(os.path.join(base, d))
                    except OSError:
                        pass


# ---------------------------------------------------------------- API latency (asyncio)

async def latency_round(path, names, concurrency, per_client):
    """`concurrency` connections, each sending `per_client` requests back to back; returns
    (latencies in ms, requests per second)."""
    conns = [await asyncio.open_unix_connection(path) for _ in range(concurrency)]
    start = asyncio.Event()
    latencies = []

    async def client(i, reader, writer):
        await start.wait()
        rng = random.Random(i)
        for k in range(per_client):
            url = "/v1/pool" if (i + k) % 2 else f"/v1/vms/{rng.choice(names)}"
            t = time.perf_counter()
            writer.write(f"GET {url} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = None
            for line in head.split(b"\r\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError(f"GET {url}: no Content-Length")
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - t) * 1e3)
            if status != 200:
                raise RuntimeError(f"GET {url}: {status}")
        writer.close()

    tasks = [asyncio.create_task(client(i, r, w)) for i, (r, w) in enumerate(conns)]
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return latencies, len(latencies) / (time.perf_counter() - t0)


def api_latency(pool, names, concurrency, per_client, runs):
    p50, p99, rate = [], [], []
    for _ in range(runs):
        lat, r = asyncio.run(latency_round(pool.socket, names, concurrency, per_client))
        p50.append(percentile(lat, 50))
        p99.append(percentile(lat, 99))
        rate.append(r)
    return p50, p99, rate


# ---------------------------------------------------------------- the QEMU side

class QemuFleet:
    def __init__(self, kernel, workdir):
        self.kernel = kernel
        self.dir = os.path.join(workdir, "qemu")
        os.makedirs(self.dir)
        self.procs = []

    def spawn(self, count, timeout=300):
        """Starts `count` more QEMUs at once; returns seconds until all printed."""
        first = len(self.procs)
        t0 = time.perf_counter()
        for i in range(first, first + count):
            log = os.path.join(self.dir, f"{i}.log")
            self.procs.append(subprocess.Popen(
                ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", f"{MEMORY_MIB}M",
                 "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
                 "-serial", f"file:{log}", "-kernel", self.kernel, "-append", CMDLINE],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        pending = set(range(first, first + count))
        deadline = time.monotonic() + timeout
        while pending:
            for i in list(pending):
                try:
                    with open(os.path.join(self.dir, f"{i}.log"), "rb") as f:
                        if any(m in f.read(256) for m in FIRST_OUTPUT):
                            pending.discard(i)
                            continue
                except OSError:
                    pass
                if self.procs[i].poll() is not None:
                    raise RuntimeError(f"QEMU {i} exited ({self.procs[i].returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} QEMUs printed nothing within {timeout} s")
            time.sleep(0.005)
        return time.perf_counter() - t0

    def pss_mib(self):
        return sum(pss_kib(p.pid) for p in self.procs) / 1024

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


# ---------------------------------------------------------------- the run

def settle(seconds=1.0):
    time.sleep(seconds)


def grow(what, step, total, cap, floor_mib, batch):
    """Adds VMs in batches (step(n) starts n) until `cap`, the memory floor, or a failure;
    returns which of these stopped it."""
    while total < cap:
        if mem_available_mib() < floor_mib:
            print(f"  {what}: MemAvailable {mem_available_mib():.0f} MiB is under the floor "
                  f"at {total} VMs; stopping")
            return "the memory floor"
        n = min(batch, cap - total)
        try:
            step(n)
        except RuntimeError as e:
            print(f"  {what}: stopping at about {total} VMs: {e}")
            return "a failed start"
        total += n
    return "the cap"


def interrupted(*_):
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hyperpool", default="target/x86_64-unknown-linux-gnu/release/hyperpool")
    ap.add_argument("--vms", type=int, default=100, help="VMs per creation-rate run")
    ap.add_argument("--rate-runs", type=int, default=3)
    ap.add_argument("--tiny-runs", type=int, default=3,
                    help="creation-rate runs with tiny-idle.elf (the pool without the guest)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent creating clients")
    ap.add_argument("--concurrency", type=int, default=200, help="requests in flight (latency)")
    ap.add_argument("--requests", type=int, default=10, help="requests per latency client")
    ap.add_argument("--latency-runs", type=int, default=3)
    ap.add_argument("--cap", type=int, default=1000, help="most Hyperpool VMs for density")
    ap.add_argument("--qemu-cap", type=int, default=1000, help="most QEMUs for density")
    ap.add_argument("--min-available-gib", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=100, help="VMs added per density step")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    if not os.path.exists(args.hyperpool):
        sys.exit(f"{args.hyperpool} not found: build it with `cargo build --release -p hyperpool`")
    if os.geteuid() != 0:
        sys.exit("run as root: the daemon puts each VM in a cgroup, and VMM PSS needs /proc")
    if not args.no_qemu and not shutil.which("qemu-system-x86_64"):
        sys.exit("qemu-system-x86_64 not found: apt-get install qemu-system-x86 (or --no-qemu)")
    hp = os.path.abspath(args.hyperpool)
    floor_mib = args.min_available_gib * 1024

    # SIGTERM unwinds like Ctrl-C, through the clean-up below.
    signal.signal(signal.SIGTERM, interrupted)
    workdir = tempfile.mkdtemp(prefix="hp-pool-")
    pool = Pool(hp, workdir, args.clients)
    qemu = None
    try:
        subprocess.run([hp, "guest", "probe", workdir], check=True, stdout=subprocess.DEVNULL)
        print(f"guest: probe.elf, {MEMORY_MIB} MiB, 1 vCPU, cmdline {CMDLINE!r}; "
              f"{os.cpu_count()} host cores; {load()}")
        pool.start()
        base_avail = mem_available_mib()
        base_info = meminfo()
        base_daemon = pss_kib(pool.daemon.pid)

        # a. creation rate; first with tiny-idle.elf, whose boot costs next to nothing even
        # where guest kernel code is emulated (PVM): what the pool path itself sustains
        tiny_rates = []
        for run in range(args.tiny_runs):
            secs, _, _ = pool.create(args.vms, kernel=os.path.join(workdir, "tiny-idle.elf"))
            tiny_rates.append(args.vms / secs)
            print(f"  creation run, tiny-idle.elf: {args.vms} VMs in {secs * 1e3:.0f} ms "
                  f"({args.vms / secs:.1f} VMs/s); {load()}")
            pool.remove_all()
            settle(0.5)
        rates, create_ms = [], []
        for run in range(args.rate_runs):
            if run:
                pool.remove_all()
                settle(0.5)
            daemon_before = threads_ms(pool.daemon.pid)
            client_before = os.times()
            secs, lat, _ = pool.create(args.vms)
            client_after = os.times()
            daemon_after = threads_ms(pool.daemon.pid)
            rates.append(args.vms / secs)
            create_ms.extend(lat)
            print(f"  creation run {run + 1}: {args.vms} VMs in {secs * 1e3:.0f} ms "
                  f"({args.vms / secs:.1f} VMs/s); {load()}")
        running = list(pool.names)
        settle()
        # Where the CPU of the last run went (the guests have reached their idle loop by now).
        vmm_threads = [threads_ms(d) for d in pool.pids()]
        budget = (sum(v for v, _ in vmm_threads) / args.vms,
                  sum(o for _, o in vmm_threads) / args.vms,
                  (sum(daemon_after) - sum(daemon_before)) / args.vms,
                  (sum(client_after[:2]) - sum(client_before[:2])) * 1e3 / args.vms)

        # b. API latency with the VMs running
        p50, p99, rps = api_latency(pool, running, args.concurrency, args.requests,
                                    args.latency_runs)

        # c. memory per idle VM
        own, guest = pool.memory(running)
        daemon_per_vm = (pss_kib(pool.daemon.pid) - base_daemon) / 1024 / len(running)

        print()
        print(f"Hyperpool pool daemon, {args.vms} VMs per run, {args.clients} creating clients "
              f"(min / median / max); {load()}")
        print(f"  creation rate (POST ?start=true -> first output)  {fmt3(rates, 1)} VMs/s"
              f"   (target >= 100)")
        if tiny_rates:
            print(f"  creation rate, tiny-idle.elf guest instead        {fmt3(tiny_rates, 1)} VMs/s")
        print(f"  CPU per probe VM started: guest vCPU {budget[0]:.1f} ms, rest of its VMM "
              f"{budget[1]:.1f} ms, daemon {budget[2]:.1f} ms, this client {budget[3]:.1f} ms")
        print(f"  create+start request latency                      {fmt3(create_ms, 1)} ms")
        if p50:  # none with --latency-runs 0
            print(f"  API latency p50, {args.concurrency} in flight              "
                  f"{fmt3(p50)} ms")
            print(f"  API latency p99, {args.concurrency} in flight              "
                  f"{fmt3(p99)} ms")
            print(f"  API throughput                                    {fmt3(rps, 0)} req/s")
        print(f"  VMM PSS - guest pages, per VM                     {fmt3(own)} MiB"
              f"   (target <= 3)")
        print(f"  guest pages resident, per VM                      {fmt3(guest)} MiB")
        print(f"  daemon's PSS growth, per VM                       {daemon_per_vm:.3f} MiB")

        # d. density
        print()
        print(f"density: adding {args.batch} VMs at a time up to {args.cap} while MemAvailable "
              f">= {floor_mib:.0f} MiB")

        def add_hp(n):
            secs, _, _ = pool.create(n)
            print(f"  hyperpool: {len(pool.names)} VMs ({n} more in {secs * 1e3:.0f} ms, "
                  f"MemAvailable {mem_available_mib():.0f} MiB)")

        hp_stop = grow("hyperpool", add_hp, len(pool.names), args.cap, floor_mib, args.batch)
        settle(2)
        hp_pids = pool.pids()
        hp_count = len(hp_pids)
        hp_pss = sum(pss_kib(p) for p in hp_pids) / 1024
        hp_drop = (base_avail - mem_available_mib()) / hp_count
        hp_breakdown = breakdown(base_info, meminfo(), hp_count)
        hp_idle = idle_cpu(hp_pids)
        daemon_pss = pss_kib(pool.daemon.pid) / 1024
        running_names = [r["spec"]["name"] for r in pool.api.ok("GET", "/v1/vms")
                         if r["status"] == "running"]
        lat_at = api_latency(pool, running_names, args.concurrency, args.requests, 1)
        pool.stop()

        q = None
        if not args.no_qemu:
            settle(2)
            q_base = mem_available_mib()
            q_info = meminfo()
            qemu = QemuFleet(os.path.join(workdir, "probe.elf"), workdir)
            q_first = qemu.spawn(min(args.vms, args.qemu_cap))
            q_rate = len(qemu.procs) / q_first
            print(f"  qemu: {len(qemu.procs)} VMs in {q_first * 1e3:.0f} ms "
                  f"({q_rate:.1f} VMs/s), MemAvailable {mem_available_mib():.0f} MiB")

            def add_q(n):
                secs = qemu.spawn(n)
                print(f"  qemu: {len(qemu.procs)} VMs ({n} more in {secs * 1e3:.0f} ms, "
                      f"MemAvailable {mem_available_mib():.0f} MiB)")

            q_stop = grow("qemu", add_q, len(qemu.procs), args.qemu_cap, floor_mib, args.batch)
            settle(2)
            q_count = sum(1 for p in qemu.procs if p.poll() is None)
            q = (q_count, qemu.pss_mib() / q_count, (q_base - mem_available_mib()) / q_count,
                 q_rate, breakdown(q_info, meminfo(), q_count),
                 idle_cpu([p.pid for p in qemu.procs]), q_stop)
            qemu.kill()

        print()
        print(f"density (128 MiB idle probe VMs; {load()})")
        print(f"  hyperpool: {hp_count} VMs running (stopped by {hp_stop}); VMM PSS {hp_pss / hp_count:.2f} MiB/VM "
              f"(+ daemon {daemon_pss / hp_count:.3f}), MemAvailable drop "
              f"{hp_drop:.2f} MiB/VM; idle CPU {hp_idle:.3f} ms/s per VM; API p50/p99 at "
              f"this size {lat_at[0][0]:.1f}/{lat_at[1][0]:.1f} ms")
        print(f"    host memory growth: {hp_breakdown}")
        if q:
            print(f"  qemu:      {q[0]} VMs running (stopped by {q[6]}); PSS {q[1]:.2f} MiB/VM, MemAvailable drop "
                  f"{q[2]:.2f} MiB/VM; idle CPU {q[5]:.3f} ms/s per VM")
            print(f"    host memory growth: {q[4]}")
            print(f"  qemu / hyperpool: PSS per VM {q[1] / (hp_pss / hp_count):.1f}x, "
                  f"MemAvailable drop per VM {q[2] / hp_drop:.1f}x")
            print(f"  start rate: qemu processes spawned at once {q[3]:.1f} VMs/s (no daemon); "
                  f"hyperpool through the pool API {statistics.median(rates):.1f} VMs/s "
                  f"({statistics.median(rates) / q[3]:.1f}x)")
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if qemu:
            qemu.kill()
        pool.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
