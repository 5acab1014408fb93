#!/usr/bin/env python3
"""I/O benchmark: Hyperpool's virtio-blk and virtio-net against QEMU's, and fio on the host file.

The guest is the probe (`hyperpool guest probe DIR` -> probe.elf) with its `bench-blk` and
`bench-net` checks. Their loops run in guest ring 3 and drive the virtqueues themselves
(polling, MMIO notifies, no interrupts), so on PVM hosts, where guest ring 0 is emulated
about 1000x slower, the figures measure the VMM's device path, not the guest.

bench-blk (same image file, same region, for every VMM; phase times from --ms):
  seqwrite1m   1 MiB sequential writes, queue depth 8               MB/s (10^6 bytes)
  seqread1m    1 MiB sequential reads of what was written, depth 8  MB/s
  randread4k   4 KiB random reads, queue depth 32                   IOPS
  The guest checks every read against the pattern it wrote.
  Host ceiling: fio on the same file, same patterns (io_uring, or libaio if io_uring fails).
bench-net (root only: a network namespace with a TAP; no addresses, IPv6 off):
  tx  the guest keeps its TX queue full of 60-byte (pps) / 1514-byte (Gbit/s) raw frames;
      the host drops them after the TAP.
  rx  the host queues N frames in the TAP (txqueuelen raised), then tells the guest (a byte
      on the serial console) to take them: the rate is the VMM's, not the sender's.

Cache mode: Hyperpool has no cache option; `--cache auto` (default) looks at how the running
Hyperpool opened the image (/proc/PID/fdinfo: O_DIRECT or not) and gives QEMU the matching
`cache=none|writeback` and fio `--direct=1|0`.

QEMU: `qemu-system-x86_64 -accel kvm -M q35 -cpu host,-arch-capabilities`, modern-only
virtio-pci devices (`disable-legacy=on`), aio=threads, vhost off unless --qemu-vhost. q35
because the probe finds PCI through the ACPI MCFG, which microvm does not have; SeaBIOS then
takes ~8 s to boot under PVM (outside the measured phases).

Each of --runs rounds runs Hyperpool, QEMU and fio once (alternating); the report gives
min / median / max per figure and the ratios of the medians.

Usage: sudo benches/io.py [--runs N] [--ms MS] [--only blk,net] [--cache auto|writeback|none]
Needs: qemu-system-x86 and fio (scripts/setup-host.sh), ip (iproute2), /dev/kvm.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile

import benchlib
from benchlib import VmRun, die, fmt, image_opened_direct, run_quiet, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HP = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/hyperpool")
MEMORY = "512M"
MAC = "52:54:00:12:34:56"
TAP = "hpbench0"
SEQ_QD = 8
RAND_QD = 32

# Written into the TAP from inside the namespace: frames for the guest's MAC, ethertype
# 0x88b5, "HPBENCH!" and a big-endian sequence number (what bench-net's rx phase checks).
SENDER = r"""
import socket, struct, sys
size, count, mac, ifname = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
try:
    s.setsockopt(263, 20, 1)  # SOL_PACKET, PACKET_QDISC_BYPASS
except OSError:
    pass
frame = bytearray(bytes.fromhex(mac.replace(":", "")) + bytes.fromhex("020000000002")
                  + b"\x88\xb5" + b"HPBENCH!" + bytes(size - 22))
send, pack = s.send, struct.pack_into
for i in range(count):
    pack(">I", frame, 22, i)
    send(frame)
"""


class Bench:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        self.hp = args.hyperpool
        self.probe = os.path.join(work, "probe.elf")
        self.image = os.path.join(work, "disk.img")
        self.cache = None if args.cache == "auto" else args.cache
        self.ns = None

    # --- commands -----------------------------------------------------------------------

    def cmdline(self, check, extra=""):
        return f"probe={check} bench.ms={self.args.ms} {extra}".strip()

    def hp_cmd(self, check, extra, devices):
        return [self.hp, "run", "--cpus", "1", "--memory", MEMORY, "--serial", "tty",
                "--kernel", self.probe, "--cmdline", self.cmdline(check, extra)] + devices

    def qemu_cmd(self, check, extra, devices):
        return ["qemu-system-x86_64", "-accel", "kvm", "-M", "q35", "-cpu",
                "host,-arch-capabilities", "-smp", "1", "-m", MEMORY, "-nodefaults",
                "-no-user-config", "-display", "none", "-serial", "stdio",
                "-kernel", self.probe, "-append", self.cmdline(check, extra)] + devices

    def in_ns(self, cmd):
        return ["ip", "netns", "exec", self.ns, *cmd]

    # --- block --------------------------------------------------------------------------

    def blk_extra(self):
        return f"bench.blk.mib={self.args.image_mib}"

    def make_image(self):
        benchlib.write_image(self.image, self.args.image_mib)

    def settle(self):
        benchlib.settle(self.image, self.cache)

    def blk_hyperpool(self):
        self.settle()
        vm = VmRun(self.hp_cmd("bench-blk", self.blk_extra(), ["--disk", f"path={self.image}"]))
        direct = image_opened_direct(vm.proc.pid, self.image)
        vm.wait()
        if self.cache is None:
            if direct is None:
                vm.fail("could not see how it opened the image (for --cache auto)")
            self.cache = "none" if direct else "writeback"
            print(f"cache mode: Hyperpool opened the image {'with' if direct else 'without'} "
                  f"O_DIRECT -> QEMU cache={self.cache}, fio --direct={int(direct)}")
        return vm.probe("bench-blk")

    def blk_qemu(self):
        self.settle()
        devices = ["-drive", f"if=none,id=d0,file={self.image},format=raw,cache={self.cache},"
                             "aio=threads",
                   "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
        return VmRun(self.qemu_cmd("bench-blk", self.blk_extra(), devices)).wait() \
            .probe("bench-blk")

    def fio_cmd(self, engine):
        direct = 1 if self.cache == "none" else 0
        runtime = f"{self.args.ms}ms"
        # invalidate=0: fio would otherwise drop the file's page cache before each job.
        common = [f"--filename={self.image}", f"--size={self.args.image_mib}M",
                  f"--ioengine={engine}", f"--direct={direct}", "--invalidate=0",
                  f"--runtime={runtime}",
                  "--time_based", "--output-format=json"]
        return ["fio"] + common + [
            "--name=seqwrite1m", "--rw=write", "--bs=1M", f"--iodepth={SEQ_QD}",
            "--name=seqread1m", "--stonewall", "--rw=read", "--bs=1M", f"--iodepth={SEQ_QD}",
            "--name=randread4k", "--stonewall", "--rw=randread", "--bs=4k",
            f"--iodepth={RAND_QD}"]

    def blk_fio(self):
        self.settle()
        for engine in ("io_uring", "libaio"):
            out = subprocess.run(self.fio_cmd(engine), capture_output=True, text=True)
            try:
                jobs = {j["jobname"]: j for j in json.loads(out.stdout[out.stdout.find("{"):])["jobs"]}
            except (ValueError, KeyError):
                jobs = {}
            if out.returncode == 0 and jobs and all(j["error"] == 0 for j in jobs.values()):
                if engine != "io_uring" and not getattr(self, "_fio_note", False):
                    print("fio: io_uring failed, using libaio")
                    self._fio_note = True
                return {
                    f"randread4k_qd{RAND_QD}_iops": jobs["randread4k"]["read"]["iops"],
                    "seqread1m_mbps": jobs["seqread1m"]["read"]["bw_bytes"] / 1e6,
                    "seqwrite1m_mbps": jobs["seqwrite1m"]["write"]["bw_bytes"] / 1e6,
                }
        die(f"fio failed:\n$ {' '.join(self.fio_cmd('libaio'))}\n{out.stderr[-2000:]}")
        return {}

    # --- network ------------------------------------------------------------------------

    def net_setup(self):
        self.ns = f"hp-bench-{os.getpid()}"
        run_quiet(["ip", "netns", "del", self.ns])
        if run_quiet(["ip", "netns", "add", self.ns]).returncode != 0:
            die(f"ip netns add {self.ns} failed")
        ns = self.ns
        steps = [
            self.in_ns(["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"]),
            ["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap"],
            # Room for every RX frame the host queues before the guest takes them.
            ["ip", "-n", ns, "link", "set", TAP, "txqueuelen",
             str(max(self.args.rx_small, self.args.rx_large) + 1024), "up"],
        ]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                die(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def net_teardown(self):
        if self.ns:
            run_quiet(["ip", "netns", "del", self.ns])

    def tap_rx_packets(self):
        out = subprocess.run(self.in_ns(["cat", f"/sys/class/net/{TAP}/statistics/rx_packets"]),
                             capture_output=True, text=True)
        return int(out.stdout.strip() or 0)

    def on_net_line(self, vm, line):
        m = re.match(r"bench-net: rx-ready frame=(\d+) frames=(\d+) mac=(\S+)", line)
        if not m:
            return
        size, count, mac = m.groups()
        r = subprocess.run(self.in_ns(["python3", "-c", SENDER, size, count, mac, TAP]),
                           capture_output=True, text=True)
        if r.returncode != 0:
            vm.proc.kill()
            die(f"frame sender failed: {r.stderr.strip()}")
        vm.send(b"g")

    def net_extra(self):
        return f"bench.net.rx_small={self.args.rx_small} bench.net.rx_large={self.args.rx_large}"

    def net_run(self, cmd):
        before = self.tap_rx_packets()
        vm = VmRun(self.in_ns(cmd), on_line=self.on_net_line, stdin=True).wait()
        figures = vm.probe("bench-net")
        sent = sum(int(m.group(1)) for line in vm.lines
                   for m in [re.match(r"bench-net: tx frame=\d+ frames=(\d+)", line)] if m)
        arrived = self.tap_rx_packets() - before
        if arrived < sent:
            print(f"warning: {cmd[0]}: guest sent {sent} frames, the TAP counted {arrived}")
        return figures

    def net_hyperpool(self):
        return self.net_run(self.hp_cmd("bench-net", self.net_extra(),
                                        ["--net", f"tap={TAP},mac={MAC}"]))

    def net_qemu(self):
        vhost = "on" if self.args.qemu_vhost else "off"
        devices = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}",
                   "-device", f"virtio-net-pci,netdev=n0,mac={MAC},disable-legacy=on"]
        return self.net_run(self.qemu_cmd("bench-net", self.net_extra(), devices))


BLK_ROWS = [
    (f"randread4k_qd{RAND_QD}_iops", "randread 4k qd32", "IOPS", "hp >= 1.5x qemu, >= 0.7x host"),
    ("seqread1m_mbps", "seqread 1M qd8", "MB/s", ""),
    ("seqwrite1m_mbps", "seqwrite 1M qd8", "MB/s", ""),
]
NET_ROWS = [
    ("tx_pps", "tx 60-byte frames", "pps", "hp >= 1.5x qemu"),
    ("tx_gbps", "tx 1514-byte frames", "Gbit/s", ""),
    ("rx_pps", "rx 60-byte frames", "pps", "hp >= 1.5x qemu"),
    ("rx_gbps", "rx 1514-byte frames", "Gbit/s", ""),
]


def report(title, rows, results):
    print(f"\n{title} (min / median / max over {len(results['hyperpool'])} runs; "
          f"load average now {os.getloadavg()[0]:.2f})")
    cols = [k for k in ("hyperpool", "qemu", "host fio") if results.get(k)]
    head = f"{'figure':<22}{'unit':<8}" + "".join(f"{c:>34}" for c in cols)
    head += f"{'hp/qemu':>9}" + (f"{'hp/host':>9}" if "host fio" in cols else "") + "  target"
    print(head)
    for key, name, unit, target in rows:
        if not all(key in r for c in cols for r in results[c]):
            continue
        stats = {c: summary([r[key] for r in results[c]]) for c in cols}
        line = f"{name:<22}{unit:<8}"
        for c in cols:
            line += f"{' / '.join(fmt(v) for v in stats[c]):>34}"
        med = stats["hyperpool"][1]
        ratio = lambda c: f"{med / stats[c][1]:.2f}x" if stats[c][1] else "-"
        line += f"{ratio('qemu'):>9}"
        if "host fio" in cols:
            line += f"{ratio('host fio'):>9}"
        print(f"{line}  {target}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hyperpool", default=DEFAULT_HP,
                    help="binary to use (default: build and use the release binary)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ms", type=int, default=2000, help="length of each timed phase")
    ap.add_argument("--only", default="blk,net", help="blk, net or both (comma-separated)")
    ap.add_argument("--cache", choices=["auto", "writeback", "none"], default="auto")
    ap.add_argument("--image-mib", type=int, default=1024, help="image size (the bench region)")
    ap.add_argument("--rx-small", type=int, default=262144, help="60-byte frames per rx run")
    ap.add_argument("--rx-large", type=int, default=65536, help="1514-byte frames per rx run")
    ap.add_argument("--qemu-vhost", action="store_true", help="QEMU's net with vhost-net")
    ap.add_argument("--dir", help="work directory for the image (not tmpfs: O_DIRECT; "
                                  "default: a new one under /var/tmp, removed afterwards)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the guest's detail lines")
    args = ap.parse_args()
    benchlib.VERBOSE = args.verbose
    only = set(args.only.split(","))
    if not only <= {"blk", "net"} or args.runs < 1:
        ap.error("--only takes blk and/or net; --runs must be at least 1")

    if args.hyperpool == DEFAULT_HP and not args.no_build:
        print("building: cargo build --release -p hyperpool")
        if subprocess.run(["cargo", "build", "--release", "-p", "hyperpool"], cwd=ROOT).returncode:
            die("cargo build failed")
    if not os.access(args.hyperpool, os.X_OK):
        die(f"{args.hyperpool} not found")
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("fio", "fio"), ("ip", "iproute2")):
        if not shutil.which(tool):
            die(f"{tool} not found: apt-get install {pkg} (or run scripts/setup-host.sh)")
    if "net" in only and os.geteuid() != 0:
        print("bench-net needs root (network namespace and TAP): skipped")
        only.discard("net")

    work = args.dir or tempfile.mkdtemp(prefix="hyperpool-io-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    bench = Bench(args, work)
    try:
        run_quiet([args.hyperpool, "guest", "probe", work], check=True)
        print(f"guest: {bench.probe} (1 vCPU, {MEMORY}); {args.runs} runs; phases of "
              f"{args.ms} ms; load average now {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} CPUs")
        if "blk" in only:
            print(f"image: {bench.image} ({args.image_mib} MiB, written out first)")
            bench.make_image()
            res = {"hyperpool": [], "qemu": [], "host fio": []}
            for i in range(args.runs):
                res["hyperpool"].append(bench.blk_hyperpool())
                res["qemu"].append(bench.blk_qemu())
                res["host fio"].append(bench.blk_fio())
                print(f"blk run {i + 1}/{args.runs}: " + "  ".join(
                    f"{k}: {fmt(r[-1][BLK_ROWS[0][0]])} IOPS" for k, r in res.items()))
            report(f"bench-blk (cache={bench.cache})", BLK_ROWS, res)
        if "net" in only:
            bench.net_setup()
            res = {"hyperpool": [], "qemu": []}
            for i in range(args.runs):
                res["hyperpool"].append(bench.net_hyperpool())
                res["qemu"].append(bench.net_qemu())
                print(f"net run {i + 1}/{args.runs}: " + "  ".join(
                    f"{k}: {fmt(r[-1].get('tx_pps', 0))} tx pps" for k, r in res.items()))
            report(f"bench-net (QEMU vhost={'on' if args.qemu_vhost else 'off'})", NET_ROWS, res)
    finally:
        bench.net_teardown()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
