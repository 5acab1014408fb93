#!/usr/bin/env python3
"""Boot benchmark: Hyperpool against QEMU (microvm) on the same tiny PVH guests, in one run.

Measures, for each VMM, over several runs (min / median / max):
  first-output  process spawn -> first byte of guest serial output on stdout
  exit          process spawn -> process exit, for a guest that prints one line and exits
                through the debug-exit port at once
  own-memory    the VMM's resident memory minus the guest RAM it has touched (idle guest)
  50-vms        50 idle VMs spawned at once -> all printed their first line; and the host
                memory they use (sum of proportional set sizes / 50)
and prints the ratio QEMU / Hyperpool of the medians (above 1: Hyperpool is better).

Usage: benches/boot.py [--hyperpool PATH] [--runs N] [--fleet-runs N] [--fleet N]
The guests come from `hyperpool guest probe DIR`; QEMU is Debian's qemu-system-x86_64.
"""

import argparse
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

MEMORY = "128M"
MEMORY_KIB = 128 * 1024


def hyperpool_cmd(hp, kernel):
    return [hp, "run", "--memory", MEMORY, "--kernel", kernel, "--serial", "tty"]


def qemu_cmd(kernel):
    return [
        "qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-m", MEMORY,
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
        "-kernel", kernel, "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
    ]


def env():
    e = dict(os.environ)
    e["HYPERPOOL_LOG"] = "off"
    return e


def spawn(cmd):
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env())


def wait_first_byte(proc, timeout=10.0):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready or not os.read(proc.stdout.fileno(), 1):
        raise RuntimeError(f"no guest output from {proc.args[0]}")


def first_output_and_exit(cmd):
    t0 = time.perf_counter()
    proc = spawn(cmd)
    wait_first_byte(proc)
    t1 = time.perf_counter()
    proc.stdout.read()
    proc.wait(timeout=10)
    t2 = time.perf_counter()
    if proc.returncode != 1:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}, expected debug-exit code 1")
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3


def smaps_mib(pid):
    """(total RSS, RSS of the guest RAM mapping(s)) in MiB, from /proc/PID/smaps."""
    total = guest = 0
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts[0] == "Size:":
                size = int(parts[1])
            elif parts[0] == "Rss:":
                rss = int(parts[1])
                total += rss
                # Guest RAM is the one anonymous mapping at least as large as the guest.
                if size >= MEMORY_KIB:
                    guest += rss
    return total / 1024, guest / 1024


def own_memory(cmd):
    proc = spawn(cmd)
    try:
        wait_first_byte(proc)
        time.sleep(0.3)
        total, guest = smaps_mib(proc.pid)
        return total - guest
    finally:
        proc.kill()
        proc.wait()


def pss_mib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fleet(cmd, n):
    """Spawns n VMs at once; returns (ms until all printed, MiB of host memory per VM)."""
    t0 = time.perf_counter()
    procs = [spawn(cmd) for _ in range(n)]
    try:
        pending = {p.stdout.fileno(): p for p in procs}
        deadline = time.monotonic() + 60
        while pending:
            ready, _, _ = select.select(list(pending), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"{len(pending)} of {n} VMs did not boot within 60 s")
            for fd in ready:
                if not os.read(fd, 1):
                    raise RuntimeError("a VM exited before printing")
                del pending[fd]
        elapsed = (time.perf_counter() - t0) * 1e3
        time.sleep(0.3)
        per_vm = sum(pss_mib(p.pid) for p in procs) / n
        return elapsed, per_vm
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()


def summary(values):
    return min(values), statistics.median(values), max(values)


def row(name, unit, hp, qemu, lower_is_better=True):
    h = summary(hp)
    q = summary(qemu)
    ratio = q[1] / h[1] if h[1] else float("inf")
    if not lower_is_better:
        ratio = 1 / ratio
    print(f"{name:<22} {unit:<4} hyperpool {h[0]:8.2f} {h[1]:8.2f} {h[2]:8.2f}   "
          f"qemu {q[0]:8.2f} {q[1]:8.2f} {q[2]:8.2f}   qemu/hyperpool {ratio:6.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hyperpool", default="target/x86_64-unknown-linux-gnu/release/hyperpool")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--fleet", type=int, default=50)
    ap.add_argument("--fleet-runs", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(args.hyperpool):
        sys.exit(f"{args.hyperpool} not found: build it with `cargo build --release -p hyperpool`")
    if not shutil.which("qemu-system-x86_64"):
        sys.exit("qemu-system-x86_64 not found: apt-get install qemu-system-x86")

    guests = tempfile.mkdtemp(prefix="hyperpool-bench-")
    subprocess.run([args.hyperpool, "guest", "probe", guests], check=True, stdout=subprocess.DEVNULL)
    tiny = os.path.join(guests, "tiny.elf")
    idle = os.path.join(guests, "tiny-idle.elf")
    hp_exit, hp_idle = hyperpool_cmd(args.hyperpool, tiny), hyperpool_cmd(args.hyperpool, idle)
    q_exit, q_idle = qemu_cmd(tiny), qemu_cmd(idle)

    print(f"guest: {tiny} (PVH, prints one line, debug-exit), {MEMORY} RAM, 1 vCPU; "
          f"{args.runs} runs (min median max), alternating VMMs")
    for cmd in (hp_exit, q_exit):  # warm-up: page cache, KVM module state
        first_output_and_exit(cmd)
    first = {"hp": [], "q": []}
    exits = {"hp": [], "q": []}
    mem = {"hp": [], "q": []}
    for _ in range(args.runs):
        for key, cmd in (("hp", hp_exit), ("q", q_exit)):
            f, e = first_output_and_exit(cmd)
            first[key].append(f)
            exits[key].append(e)
    for _ in range(max(3, args.runs // 4)):
        mem["hp"].append(own_memory(hp_idle))
        mem["q"].append(own_memory(q_idle))
    row("spawn->first output", "ms", first["hp"], first["q"])
    row("spawn->exit", "ms", exits["hp"], exits["q"])
    row("VMM own memory", "MiB", mem["hp"], mem["q"])

    boot = {"hp": [], "q": []}
    per_vm = {"hp": [], "q": []}
    for _ in range(args.fleet_runs):
        for key, cmd in (("hp", hp_idle), ("q", q_idle)):
            t, m = fleet(cmd, args.fleet)
            boot[key].append(t)
            per_vm[key].append(m)
    row(f"{args.fleet} VMs all booted", "ms", boot["hp"], boot["q"])
    row(f"{args.fleet} VMs memory/VM", "MiB", per_vm["hp"], per_vm["q"])
    shutil.rmtree(guests, ignore_errors=True)


if __name__ == "__main__":
    main()
