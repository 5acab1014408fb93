#!/usr/bin/env python3
"""Out-of-process disks (vhost-user) against in-process ones, and our backend under QEMU.

The guest is the probe's `bench-blk` (ring 3, polling: see io.py), on the same image for every
configuration, one after another in each run:

  hyperpool      hyperpool run --disk path=IMG                          (device in the VMM)
  hp+vu          hyperpool run --disk vhost_user=true,socket=S,queue_size=256
                 + hyperpool device blk --socket S --disk path=IMG       (device in its own process)
  qemu           QEMU's built-in virtio-blk-pci (aio=threads, cache as Hyperpool's)
  qemu+vu(hp)    QEMU's vhost-user-blk-pci + hyperpool device blk        (our backend, QEMU's frontend)
  qemu+vu(qsd)   QEMU's vhost-user-blk-pci + qemu-storage-daemon         (QEMU's own backend)

Target: hp+vu >= 0.9x hyperpool (out of process costs at most 10% of the IOPS).
QEMU runs `-accel kvm -M q35` with its RAM in a shared memfd (vhost-user needs it); SeaBIOS takes
~8 s under PVM, outside the measured phases.

With --linux, also Linux's own virtio-blk driver under QEMU's emulator (TCG) running fio
(4 KiB random reads, libaio, O_DIRECT, queue depth 32) on the same image, with QEMU's built-in
virtio-blk and with vhost-user-blk on `hyperpool device blk`. TCG emulates the guest, so this
mostly measures the emulated guest; it shows that the backend keeps up with a real driver.

Usage: benches/vhost_user.py [--runs N] [--ms MS] [--image-mib N] [--no-qemu] [--linux]
Needs: qemu-system-x86 and qemu-storage-daemon (scripts/setup-host.sh), /dev/kvm; --linux also
the project's Debian guest (built with `hyperpool guest debian DIR` if --debian DIR lacks it).
"""

import argparse
import gzip
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import benchlib
from benchlib import VmRun, die, fmt, image_opened_direct, run_quiet, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_HP = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/hyperpool")
MEMORY_MIB = 512
SOCKET_WAIT = 10.0  # seconds for a backend to create its socket

ROWS = [
    ("randread4k_qd32_iops", "randread 4k qd32", "IOPS"),
    ("seqread1m_mbps", "seqread 1M qd8", "MB/s"),
    ("seqwrite1m_mbps", "seqwrite 1M qd8", "MB/s"),
]
CONFIGS = ["hyperpool", "hp+vu", "qemu", "qemu+vu(hp)", "qemu+vu(qsd)"]


class Backend:
    """A vhost-user backend process serving one socket, stopped with SIGTERM."""

    def __init__(self, cmd, socket):
        self.cmd = cmd
        self.socket = socket
        if os.path.exists(socket):
            os.unlink(socket)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=dict(os.environ, HYPERPOOL_LOG="warn"))
        deadline = time.monotonic() + SOCKET_WAIT
        while not os.path.exists(socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                die(f"backend did not create {socket}\n$ {' '.join(cmd)}\n"
                    f"{self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.005)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    def __init__(self, args, work):
        self.args = args
        self.hp = args.hyperpool
        self.probe = os.path.join(work, "probe.elf")
        self.image = os.path.join(work, "disk.img")
        self.socket = os.path.join(work, "blk.sock")
        self.cache = None

    def cmdline(self):
        return f"probe=bench-blk bench.ms={self.args.ms} bench.blk.mib={self.args.image_mib}"

    def hp_cmd(self, disk):
        return [self.hp, "run", "--cpus", "1", "--memory", f"{MEMORY_MIB}M", "--serial", "tty",
                "--kernel", self.probe, "--cmdline", self.cmdline(), "--disk", disk]

    def qemu_cmd(self, devices):
        return ["qemu-system-x86_64", "-accel", "kvm", "-M", "q35,memory-backend=mem", "-cpu",
                "host,-arch-capabilities", "-smp", "1", "-m", f"{MEMORY_MIB}M",
                "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
                "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                "-kernel", self.probe, "-append", self.cmdline()] + devices

    def hp_backend(self):
        return Backend([self.hp, "device", "blk", "--socket", self.socket,
                        "--disk", f"path={self.image}"], self.socket)

    def qsd_backend(self):
        direct = "on" if self.cache == "none" else "off"
        return Backend(["qemu-storage-daemon", "--blockdev",
                        f"driver=file,node-name=f,filename={self.image},aio=io_uring,"
                        f"cache.direct={direct}",
                        "--export", "type=vhost-user-blk,id=e,node-name=f,writable=on,"
                        f"addr.type=unix,addr.path={self.socket}"], self.socket)

    def make_image(self):
        benchlib.write_image(self.image, self.args.image_mib)

    def settle(self):
        benchlib.settle(self.image, self.cache)

    def learn_cache(self, pid, what):
        """QEMU's cache mode follows how our device opened the image (O_DIRECT or not)."""
        direct = image_opened_direct(pid, self.image)
        if self.cache is None:
            if direct is None:
                die(f"{what}: could not see how it opened the image")
            self.cache = "none" if direct else "writeback"
            print(f"cache mode: Hyperpool opened the image {'with' if direct else 'without'} "
                  f"O_DIRECT -> QEMU cache={self.cache}")

    def with_backend(self, backend, cmd, learn=False):
        self.settle()
        try:
            if learn:
                self.learn_cache(backend.proc.pid, "hyperpool device blk")
            return VmRun(cmd).wait().probe("bench-blk")
        finally:
            backend.stop()

    def run(self, config):
        if config == "hyperpool":
            self.settle()
            vm = VmRun(self.hp_cmd(f"path={self.image}"))
            self.learn_cache(vm.proc.pid, "hyperpool run")
            return vm.wait().probe("bench-blk")
        if config == "hp+vu":
            backend = self.hp_backend()
            return self.with_backend(backend, self.hp_cmd(
                f"vhost_user=true,socket={self.socket},queue_size=256"),
                                     learn=True)
        if config == "qemu":
            self.settle()
            return VmRun(self.qemu_cmd([
                "-drive", f"if=none,id=d0,file={self.image},format=raw,cache={self.cache},"
                          "aio=threads",
                "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"])).wait().probe("bench-blk")
        vu = ["-chardev", f"socket,id=c0,path={self.socket}",
              "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1,queue-size=256,disable-legacy=on"]
        backend = self.hp_backend() if config == "qemu+vu(hp)" else self.qsd_backend()
        return self.with_backend(backend, self.qemu_cmd(vu))


LINUX_FIO_SECONDS = 10
LINUX_LIMIT = 300  # seconds for one TCG boot, fio included


def newc_archive(files):
    """A cpio archive (newc, as the kernel unpacks it) holding `files` {name: bytes}."""
    out = bytearray()

    def entry(name, data, mode):
        name_b = name.encode() + b"\0"
        fields = [1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for name, data in files.items():
        entry(name, data, 0o100755)
    entry("TRAILER!!!", b"", 0)
    return bytes(out)


class LinuxFio:
    """fio in the Debian guest under TCG, on the benchmark's image."""

    SCRIPT = (f"fio --name=r --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 "
              f"--ioengine=libaio --direct=1 --runtime={LINUX_FIO_SECONDS} --time_based "
              f"--output-format=terse --terse-version=3 > /tmp/fio.out\n"
              "echo FIO-READ-IOPS=$(cut -d';' -f8 /tmp/fio.out)\n")

    def __init__(self, bench, guest_dir, work):
        self.bench = bench
        self.initrd = os.path.join(work, "initrd")
        parts = [gzip.compress(newc_archive({"test.sh": self.SCRIPT.encode()}))]
        for name in ("initramfs.cpio.gz", "tools.cpio.gz"):
            with open(os.path.join(guest_dir, name), "rb") as f:
                parts.append(f.read())
        with open(self.initrd, "wb") as f:
            f.write(b"".join(parts))
        self.kernel = os.path.join(guest_dir, "vmlinuz")

    def run(self, config):
        b = self.bench
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-M", "q35,memory-backend=mem",
               "-cpu", "max", "-m", f"{MEMORY_MIB}M",
               "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
               "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
               "-nodefaults", "-kernel", self.kernel, "-initrd", self.initrd,
               "-append", "console=ttyS0 panic=-1 loglevel=4"]
        backend = None
        if config == "qemu":
            cmd += ["-drive", f"if=none,id=d0,file={b.image},format=raw,cache={b.cache},"
                              "aio=threads",
                    "-device", "virtio-blk-pci,drive=d0"]
        else:
            backend = b.hp_backend()
            cmd += ["-chardev", f"socket,id=c0,path={b.socket}",
                    "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"]
        b.settle()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=LINUX_LIMIT)
        finally:
            if backend:
                backend.stop()
        m = re.search(r"FIO-READ-IOPS=(\d+)", out.stdout)
        if not m:
            die(f"fio under TCG ({config}) printed no result\n$ {' '.join(cmd)}\n"
                f"{out.stdout[-3000:]}\n{out.stderr[-1000:]}")
        return {"fio_randread_iops": float(m.group(1))}


def report_linux(results):
    n = len(next(iter(results.values())))
    print(f"\nLinux under TCG, fio randread 4k qd32 ({LINUX_FIO_SECONDS} s), min / median / max "
          f"over {n} runs")
    stats = {c: summary([r["fio_randread_iops"] for r in rs]) for c, rs in results.items()}
    for c, s in stats.items():
        print(f"  {c:<14}{' / '.join(fmt(v) for v in s):>30} IOPS")
    print(f"  ratio qemu+vu(hp) / qemu: {stats['qemu+vu(hp)'][1] / stats['qemu'][1]:.2f}x")


def report(results):
    n = len(next(iter(results.values())))
    print(f"\nbench-blk, min / median / max over {n} runs (load average now "
          f"{os.getloadavg()[0]:.2f})")
    cols = list(results)
    print(f"{'figure':<20}{'unit':<7}" + "".join(f"{c:>30}" for c in cols)
          + f"{'vu/in':>8}" + (f"{'hp-be/qsd':>11}" if "qemu+vu(qsd)" in cols else ""))
    for key, name, unit in ROWS:
        stats = {c: summary([r[key] for r in results[c]]) for c in cols}
        line = f"{name:<20}{unit:<7}" + "".join(
            f"{' / '.join(fmt(v) for v in stats[c]):>30}" for c in cols)
        line += f"{stats['hp+vu'][1] / stats['hyperpool'][1]:>7.2f}x"
        if "qemu+vu(qsd)" in cols:
            line += f"{stats['qemu+vu(hp)'][1] / stats['qemu+vu(qsd)'][1]:>10.2f}x"
        print(line)
    print("target: hp+vu >= 0.90x hyperpool (randread IOPS)")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hyperpool", default=DEFAULT_HP,
                    help="binary to use (default: build and use the release binary)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build first")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ms", type=int, default=2000, help="length of each timed phase")
    ap.add_argument("--image-mib", type=int, default=1024, help="image size (the bench region)")
    ap.add_argument("--no-qemu", action="store_true", help="only Hyperpool's two configurations")
    ap.add_argument("--linux", action="store_true",
                    help="also fio in the Debian guest under QEMU TCG (slow: a boot per run)")
    ap.add_argument("--debian", default=os.path.join(ROOT, "target/debian-guest"),
                    help="the Debian guest's directory (built there if missing)")
    ap.add_argument("--dir", help="work directory (not tmpfs: O_DIRECT; default: a new one "
                                  "under /var/tmp, removed afterwards)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the guest's detail lines")
    args = ap.parse_args()
    benchlib.VERBOSE = args.verbose
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.hyperpool == DEFAULT_HP and not args.no_build:
        print("building: cargo build --release -p hyperpool")
        if subprocess.run(["cargo", "build", "--release", "-p", "hyperpool"], cwd=ROOT).returncode:
            die("cargo build failed")
    if not os.access(args.hyperpool, os.X_OK):
        die(f"{args.hyperpool} not found")
    configs = CONFIGS[:2] if args.no_qemu else CONFIGS
    if not args.no_qemu:
        for tool in ("qemu-system-x86_64", "qemu-storage-daemon"):
            if not shutil.which(tool):
                die(f"{tool} not found: apt-get install qemu-system-x86 "
                    "(or run scripts/setup-host.sh), or pass --no-qemu")

    work = args.dir or tempfile.mkdtemp(prefix="hyperpool-vu-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    bench = Bench(args, work)
    try:
        run_quiet([args.hyperpool, "guest", "probe", work], check=True)
        print(f"guest: {bench.probe} (1 vCPU, {MEMORY_MIB} MiB); image {args.image_mib} MiB; "
              f"{args.runs} runs; phases of {args.ms} ms")
        bench.make_image()
        results = {c: [] for c in configs}
        for i in range(args.runs):
            for c in configs:
                results[c].append(bench.run(c))
            print(f"run {i + 1}/{args.runs}: " + "  ".join(
                f"{c}: {fmt(r[-1][ROWS[0][0]])}" for c, r in results.items()))
        report(results)
        if args.linux:
            if not all(os.path.exists(os.path.join(args.debian, f))
                       for f in ("vmlinuz", "initramfs.cpio.gz", "tools.cpio.gz")):
                print(f"building the Debian guest in {args.debian}")
                if subprocess.run([args.hyperpool, "guest", "debian", args.debian]).returncode:
                    die("hyperpool guest debian failed")
            linux = LinuxFio(bench, args.debian, work)
            lres = {"qemu": [], "qemu+vu(hp)": []}
            for i in range(args.runs):
                for c in lres:
                    lres[c].append(linux.run(c))
                print(f"linux run {i + 1}/{args.runs}: " + "  ".join(
                    f"{c}: {fmt(r[-1]['fio_randread_iops'])}" for c, r in lres.items()))
            report_linux(lres)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
