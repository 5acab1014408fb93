"""What the benchmark scripts share: running a VM and reading its probe lines, statistics,
and how a process opened an image."""

import os
import re
import statistics
import subprocess
import sys
import threading
import time

O_DIRECT = 0o40000
RUN_LIMIT = 300  # seconds, one VM run (QEMU's SeaBIOS alone takes ~8 s under PVM)
VERBOSE = False  # print the guest's bench detail lines


def die(msg):
    sys.exit(f"{os.path.basename(sys.argv[0])}: {msg}")


def run_quiet(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def summary(values):
    return min(values), statistics.median(values), max(values)


def parse_figures(text):
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", text)}


class VmRun:
    """One VM: spawned, its stdout read line by line, with a handler for lines as they come."""

    def __init__(self, cmd, on_line=None, stdin=False):
        self.cmd = cmd
        self.lines = []
        env = dict(os.environ, HYPERPOOL_LOG="warn")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.on_line = on_line

    def wait(self):
        killed = []
        timer = threading.Timer(RUN_LIMIT, lambda: (killed.append(True), self.proc.kill()))
        timer.start()
        try:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.lines.append(line)
                if self.on_line:
                    self.on_line(self, line)
            self.proc.wait()
        finally:
            timer.cancel()
        if killed:
            self.fail(f"did not finish within {RUN_LIMIT} s")
        return self

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def fail(self, why):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        tail = "\n".join(self.lines[-15:])
        err = b"".join(self.stderr[-10:]).decode(errors="replace")
        die(f"{self.cmd[0]}: {why}\n$ {' '.join(self.cmd)}\n--- stdout (tail) ---\n{tail}\n"
            f"--- stderr (tail) ---\n{err}")

    def probe(self, check):
        if VERBOSE:
            for line in self.lines:
                if line.startswith(("bench-", "PROBE bench-")):
                    print(f"  {self.cmd[0] if self.cmd[0] != 'ip' else self.cmd[4]}: {line}")
        for line in self.lines:
            if line.startswith(f"PROBE {check} "):
                if not line.startswith(f"PROBE {check} ok"):
                    self.fail(line)
                return parse_figures(line[len(f"PROBE {check} ok"):])
        self.fail(f"no 'PROBE {check}' line")
        return {}


def image_opened_direct(pid, image, timeout=5.0):
    """Whether process `pid` holds `image` open with O_DIRECT (None if it never opens it)."""
    want = os.path.realpath(image)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") != want:
                        continue
                    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                        for line in f:
                            if line.startswith("flags:"):
                                return bool(int(line.split()[1], 8) & O_DIRECT)
                except OSError:
                    continue
        except OSError:
            return None
        time.sleep(0.005)
    return None


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def write_image(path, mib):
    """A zero-filled image written out (not sparse), so every run starts from allocated blocks."""
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
    os.sync()


def settle(image, cache):
    """The same start for every run: nothing dirty, and with the page cache in play (cache mode
    other than none) the whole image cached, as other programs may have evicted it."""
    os.sync()
    if cache != "none":
        with open(image, "rb") as f:
            while f.read(4 << 20):
                pass
