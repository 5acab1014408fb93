//! Running the real `hyperpool` binary on real KVM, with time limits, and reading what it printed.
#![allow(dead_code)]

pub mod debian;
pub mod netns;
pub mod qemu_tcg;
pub mod vhost_user_backend;
pub mod vmm;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn hyperpool() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hyperpool"))
}

/// False (skip) when /dev/kvm is missing, unless CI=true, where that is a failure.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("/dev/kvm is missing on a CI machine: KVM tests cannot run");
    }
    eprintln!("skipping: /dev/kvm is missing");
    false
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Finished {
    fn from(out: std::process::Output) -> Self {
        Self {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }
}

impl Finished {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// The `PROBE <name> ...` line for a check.
    pub fn probe_line(&self, name: &str) -> Option<&str> {
        let prefix = format!("PROBE {name} ");
        self.stdout
            .lines()
            .map(str::trim_end)
            .find(|l| l.starts_with(&prefix))
    }

    /// The figures after `PROBE <name> ok `, failing the test if the check failed or is absent.
    pub fn probe_ok(&self, name: &str) -> &str {
        let line = self
            .probe_line(name)
            .unwrap_or_else(|| panic!("no PROBE {name} line\n{}", self.describe()));
        let ok = format!("PROBE {name} ok");
        assert!(line.starts_with(&ok), "{line}\n{}", self.describe());
        line[ok.len()..].trim()
    }

    pub fn describe(&self) -> String {
        format!(
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// `hyperpool ARGS` with stdin closed and its output captured.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(hyperpool());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `hyperpool ARGS`, killing it after `limit`.
pub fn run(args: &[&str], limit: Duration) -> Finished {
    wait_with_limit(command(args).spawn().expect("spawn hyperpool"), limit)
}

pub fn wait_with_limit(mut child: Child, limit: Duration) -> Finished {
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let s = child.wait().expect("wait");
            let f = Finished {
                status: s,
                stdout: t_out.join().unwrap_or_default(),
                stderr: t_err.join().unwrap_or_default(),
            };
            panic!(
                "hyperpool did not finish within {limit:?}\n{}",
                f.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs `hyperpool ARGS` with logging off, so only an error line can reach stderr.
pub fn run_quiet(args: &[&str]) -> Finished {
    let child = command(args)
        .env("HYPERPOOL_LOG", "off")
        .spawn()
        .expect("spawn hyperpool");
    wait_with_limit(child, Duration::from_secs(30))
}

/// Bad input was refused as promised: exit 2, one line `hyperpool: error: ...` naming the
/// problem (`needle`), no panic, and no guest ever ran.
pub fn assert_refused(f: &Finished, needle: &str) {
    assert_eq!(f.code(), 2, "{}", f.describe());
    let lines: Vec<&str> = f.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line\n{}", f.describe());
    assert!(
        lines[0].starts_with("hyperpool: error: "),
        "{}",
        f.describe()
    );
    assert!(
        lines[0].contains(needle),
        "expected '{needle}'\n{}",
        f.describe()
    );
    assert!(!f.stderr.contains("panicked") && !f.stderr.contains("RUST_BACKTRACE"));
    assert!(
        !f.stdout.contains("PROBE"),
        "the guest must not start\n{}",
        f.describe()
    );
}

/// Spawns `hyperpool ARGS` and hands back its stdout lines as they come.
pub fn spawn_lines(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = command(args).spawn().expect("spawn hyperpool");
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Sends SIGTERM and waits for the exit status.
pub fn terminate(child: &mut Child, limit: Duration) -> ExitStatus {
    // SAFETY: kill(2) on a pid we spawned and have not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hyperpool ignored SIGTERM for {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Probe runs are short; this bounds a hung one.
pub const PROBE_LIMIT: Duration = Duration::from_secs(120);

/// False (skip) when `qemu-img` (qemu-utils) is missing, unless CI=true, where that is a failure.
pub fn qemu_img_available() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu-img is needed in CI (apt-get install qemu-utils)"
        );
        eprintln!("qemu-img not found: skipping");
    }
    ok
}

pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the probe's `blk` check writes at LBA 1..=8.
pub fn blk_pattern() -> Vec<u8> {
    let mut buf = vec![b'.'; 8 * 512];
    for (i, sector) in buf.chunks_exact_mut(512).enumerate() {
        let text = format!("HYPERPOOL-PROBE-{}", i + 1);
        sector[..text.len()].copy_from_slice(text.as_bytes());
    }
    buf
}
