//! The project's Debian guest under QEMU's pure emulator (TCG, no KVM): Linux's own virtio
//! drivers as a client of our devices. A test hands in a shell script; it goes into the guest
//! as `/test.sh` (an archive put in front of the guest's initramfs and its tools archive), which
//! `/init` runs before powering off. The serial console is the test's output.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyperpool_guest_images::{CpioWriter, INIT_MARKER};

use super::debian::debian_guest;

/// Guest memory; shared (memfd) because vhost-user backends map it.
pub const MEMORY_MIB: u32 = 512;

/// The Debian guest and QEMU, or None (skip) when either is missing, a failure under CI=true.
pub fn tcg_guest() -> Option<PathBuf> {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "qemu-system-x86_64 is missing on a CI machine (scripts/setup-host.sh installs it)"
        );
        eprintln!("skipping: qemu-system-x86_64 is missing");
        return None;
    }
    let dir = debian_guest()?;
    assert!(
        dir.join("tools.cpio.gz").is_file(),
        "{} has no tools.cpio.gz",
        dir.display()
    );
    Some(dir)
}

/// What a guest run printed, and when.
#[derive(Debug)]
pub struct TcgRun {
    /// The serial console, whole.
    pub serial: String,
    /// From QEMU's start to the line `/init` prints; None if it never came.
    pub to_init: Option<Duration>,
    /// From QEMU's start to its exit.
    pub elapsed: Duration,
    /// `/test.sh`'s exit status as `/init` reported it; None if it never finished.
    pub script_status: Option<i32>,
    /// QEMU's stderr.
    pub stderr: String,
}

impl TcgRun {
    /// Fails the test unless the script ran to the end with status 0.
    pub fn assert_ok(&self) {
        assert_eq!(self.script_status, Some(0), "{}", self.describe());
    }

    /// The text after `KEY=` on the first serial line starting so.
    pub fn value(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.serial
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    pub fn describe(&self) -> String {
        format!(
            "to /init: {:?}, total {:?}, script status {:?}\n--- serial ---\n{}\n--- qemu stderr ---\n{}",
            self.to_init, self.elapsed, self.script_status, self.serial, self.stderr
        )
    }
}

/// A newc archive holding `/test.sh`. Uncompressed archives must start 4-byte aligned, so it
/// goes first, ahead of the compressed ones.
fn script_archive(script: &str) -> Vec<u8> {
    let mut w = CpioWriter::new(Vec::new());
    w.file("test.sh", 0o755, script.as_bytes()).unwrap();
    w.finish().unwrap()
}

/// One boot of the guest.
pub struct TcgBoot<'a> {
    pub guest: &'a Path,
    /// Runs under `sh` in the guest with PATH set; `set -e` is up to the script.
    pub script: &'a str,
    /// Device arguments, e.g. `-chardev socket,...` and `-device vhost-user-blk-pci,...`.
    pub device_args: Vec<String>,
    /// Wall-clock limit; QEMU is killed after it.
    pub limit: Duration,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<&'a str>,
}

impl TcgBoot<'_> {
    pub fn run(&self) -> TcgRun {
        let work = tempfile::tempdir().unwrap();
        let initrd = work.path().join("initrd");
        let mut all = script_archive(self.script);
        for part in ["initramfs.cpio.gz", "tools.cpio.gz"] {
            all.extend(std::fs::read(self.guest.join(part)).unwrap());
        }
        std::fs::write(&initrd, all).unwrap();

        let mut cmd = match self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let mem = format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on");
        cmd.args([
            "-accel",
            "tcg",
            "-M",
            "q35,memory-backend=mem",
            "-cpu",
            "max",
        ])
        .args(["-m", &format!("{MEMORY_MIB}M"), "-object", &mem])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-nodefaults"])
        .arg("-kernel")
        .arg(self.guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        // panic=-1 with -no-reboot: a guest panic ends QEMU rather than hanging the test.
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .args(&self.device_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().expect("spawn qemu-system-x86_64");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).into_owned();
                if tx.send((start.elapsed(), line)).is_err() {
                    break;
                }
            }
        });
        let t_err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = start + self.limit;
        let mut serial = String::new();
        let mut to_init = None;
        let mut timed_out = false;
        loop {
            let now = Instant::now();
            match rx.recv_timeout(deadline.saturating_duration_since(now)) {
                Ok((at, line)) => {
                    if to_init.is_none() && line.contains(INIT_MARKER) {
                        to_init = Some(at);
                    }
                    serial.push_str(line.trim_end_matches('\r'));
                    serial.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    let _ = child.kill();
                    break;
                }
            }
        }
        let _ = child.wait();
        let elapsed = start.elapsed();
        let run = TcgRun {
            script_status: serial.lines().find_map(|l| {
                l.strip_prefix("HYPERPOOL-INIT: /test.sh exited with status ")
                    .and_then(|s| s.trim().parse().ok())
            }),
            serial,
            to_init,
            elapsed,
            stderr: t_err.join().unwrap_or_default(),
        };
        assert!(
            !timed_out,
            "the guest did not power off within {:?}\n{}",
            self.limit,
            run.describe()
        );
        eprintln!(
            "TCG guest: /init after {:?}, powered off after {:?}",
            run.to_init, run.elapsed
        );
        run
    }
}
