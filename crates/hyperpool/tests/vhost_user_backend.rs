//! `hyperpool device ...` as a vhost-user backend, with QEMU (TCG, no KVM) as the frontend and
//! our probe guest as the driver: every request crosses QEMU's vhost-user code and our backend
//! process. Covers blk (raw, read-only, qcow2 overlay), rng, vsock and net (in a namespace),
//! the sandbox (seccomp, no new privileges), a garbage-sending client, SIGTERM, bad input, and
//! a backend killed with SIGKILL and restarted while QEMU waits to reconnect.
//!
//! Needs `qemu-system-x86_64`: the tests skip without it, except in CI (`CI=true`), where they
//! fail.

mod common;

use common::netns::*;
use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
const LIMIT: Duration = Duration::from_secs(60);
const IMAGE_SIZE: u64 = 16 << 20;

fn qemu_available() -> bool {
    let ok = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{QEMU} is needed in CI (apt-get install qemu-system-x86)"
        );
        eprintln!("{QEMU} not found: skipping");
    }
    ok
}

/// A scratch directory with the probe guest's ELF in it.
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let f = run(
            &["guest", "probe", dir.path().to_str().unwrap()],
            Duration::from_secs(30),
        );
        assert_eq!(f.code(), 0, "{}", f.describe());
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// QEMU booting the probe with `cmdline` and `devices`, under TCG, guest memory in a shared
    /// memfd (vhost-user maps it).
    fn qemu(&self, cmdline: &str, devices: &[String]) -> Command {
        let mut cmd = Command::new(QEMU);
        cmd.args([
            "-accel",
            "tcg",
            "-M",
            "q35",
            "-m",
            "256",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "memory-backend=mem",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(self.path("probe.elf"))
        .args(["-append", cmdline])
        .args(devices)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }

    fn run_qemu(&self, cmdline: &str, devices: &[String]) -> Finished {
        let child = self.qemu(cmdline, devices).spawn().expect("spawn qemu");
        wait_with_limit(child, LIMIT)
    }
}

/// A `hyperpool device ...` process, killed when dropped.
struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Backend {
    fn start(socket: &Path, args: &[&str]) -> Self {
        Self::start_with(Command::new(hyperpool()), socket, args)
    }

    /// `program` is `hyperpool` itself or a wrapper (`ip netns exec NS hyperpool`).
    fn start_with(mut program: Command, socket: &Path, args: &[&str]) -> Self {
        let child = program
            .arg("device")
            .arg(args[0])
            .arg("--socket")
            .arg(socket)
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hyperpool device");
        let mut b = Self {
            child,
            socket: socket.to_owned(),
        };
        b.wait_listening();
        b
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        // Listening once the socket exists and the sandbox is on (the socket is bound first).
        while !(self.socket.exists() && self.status_line("Seccomp:").is_some_and(|s| s == "2")) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the backend exited early: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the backend did not listen on {}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of /proc/PID/status of the process that serves (the child, or with a wrapper
    /// that execs, the same pid).
    fn status_line(&self, key: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The frontend has gone: the backend reset its device (under the sandbox) and still
    /// listens for the next one.
    fn still_serving(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        if !self.alive() {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!(
                "the backend died after its frontend left
{err}"
            );
        }
        assert!(self.socket.exists());
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn chardev(id: &str, socket: &Path, extra: &str) -> [String; 2] {
    [
        "-chardev".into(),
        format!("socket,id={id},path={}{extra}", socket.display()),
    ]
}

fn blk_device(id: &str, socket: &Path) -> Vec<String> {
    let mut v = chardev(id, socket, "").to_vec();
    v.extend([
        "-device".into(),
        format!("vhost-user-blk-pci-non-transitional,chardev={id}"),
    ]);
    v
}

fn image(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
}

#[test]
fn blk_pattern_lands_on_the_image_and_a_readonly_backend_refuses_writes() {
    if !qemu_available() {
        return;
    }
    let w = Work::new();
    let (rw, ro) = (w.path("rw.img"), w.path("ro.img"));
    image(&rw);
    std::fs::write(&ro, vec![0x33u8; IMAGE_SIZE as usize]).unwrap();
    let rw_disk = format!("path={},id=rwdisk", rw.display());
    let ro_disk = format!("path={},readonly=on,id=golden", ro.display());
    let mut b1 = Backend::start(&w.path("b1.sock"), &["blk", "--disk", &rw_disk]);
    let mut b2 = Backend::start(&w.path("b2.sock"), &["blk", "--disk", &ro_disk]);
    for b in [&b1, &b2] {
        assert_eq!(b.status_line("Seccomp:").as_deref(), Some("2"), "filtered");
        assert_eq!(b.status_line("NoNewPrivs:").as_deref(), Some("1"));
    }
    let mut devices = blk_device("c1", &b1.socket);
    devices.extend(blk_device("c2", &b2.socket));
    let f = w.run_qemu("probe=blk", &devices);
    assert_eq!(
        f.probe_ok("blk"),
        "disks=2 rwdisk:rw,golden:ro",
        "{}",
        f.describe()
    );
    b1.still_serving();
    b2.still_serving();

    let data = std::fs::read(&rw).unwrap();
    assert_eq!(&data[512..4608], &blk_pattern()[..]);
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[4608..8192].iter().all(|&b| b == 0));
    assert!(
        std::fs::read(&ro).unwrap().iter().all(|&b| b == 0x33),
        "read-only image changed"
    );
}

#[test]
fn blk_on_a_qcow2_overlay_leaves_the_base_untouched() {
    if !qemu_available() || !qemu_img_available() {
        return;
    }
    let w = Work::new();
    let base: Vec<u8> = (0..IMAGE_SIZE as usize)
        .map(|i| 0x80 | (i / 512 % 97) as u8)
        .collect();
    std::fs::write(w.path("base.raw"), &base).unwrap();
    let dir = w.dir.path();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "overlay.qcow2",
        ],
    );
    let disk = format!(
        "path={},id=cow,format=qcow2",
        w.path("overlay.qcow2").display()
    );
    let mut b = Backend::start(&w.path("b.sock"), &["blk", "--disk", &disk]);
    let f = w.run_qemu("probe=blk", &blk_device("c1", &b.socket));
    assert_eq!(f.probe_ok("blk"), "disks=1 cow:rw", "{}", f.describe());
    b.still_serving();
    drop(b);

    assert_eq!(std::fs::read(w.path("base.raw")).unwrap(), base);
    let check = qemu_img(dir, &["check", "overlay.qcow2"]);
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(dir, &["convert", "-O", "raw", "overlay.qcow2", "out.raw"]);
    let out = std::fs::read(w.path("out.raw")).unwrap();
    assert_eq!(&out[512..4608], &blk_pattern()[..]);
    assert_eq!(&out[..512], &base[..512]);
    assert_eq!(&out[4608..], &base[4608..]);
}

fn rng_device(socket: &Path, extra: &str) -> Vec<String> {
    let mut v = chardev("c0", socket, extra).to_vec();
    v.extend(["-device".into(), "vhost-user-rng-pci,chardev=c0".into()]);
    v
}

/// A client that sends garbage is dropped; the backend serves the next frontend as usual.
#[test]
fn rng_serves_after_a_garbage_client_and_sigterm_removes_the_socket() {
    if !qemu_available() {
        return;
    }
    let w = Work::new();
    let mut b = Backend::start(&w.path("rng.sock"), &["rng"]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&b.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "only the owner may connect");
    for garbage in [
        &[0xffu8; 64][..],
        &[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0, 0],
    ] {
        let mut s = UnixStream::connect(&b.socket).unwrap();
        let _ = s.write_all(garbage);
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(b.alive(), "the backend survived the garbage");

    let f = w.run_qemu("probe=rng", &rng_device(&b.socket, ""));
    assert!(
        f.probe_ok("rng").starts_with("bytes=4096"),
        "{}",
        f.describe()
    );
    b.still_serving();

    let status = terminate(&mut b.child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(!b.socket.exists(), "socket removed on SIGTERM");
}

/// QEMU started paused with `reconnect=1`; the backend is killed with SIGKILL and a new one
/// started on the same socket path (replacing the stale socket); QEMU reconnects and the guest
/// then runs its check against the new process.
#[test]
fn a_killed_backend_is_restarted_and_qemu_reconnects() {
    if !qemu_available() {
        return;
    }
    let w = Work::new();
    let img = w.path("disk.img");
    image(&img);
    let disk = format!("path={},id=again", img.display());
    let socket = w.path("blk.sock");
    let mut first = Backend::start(&socket, &["blk", "--disk", &disk]);
    let monitor = w.path("monitor.sock");
    let mut devices = chardev("c0", &socket, ",reconnect=1").to_vec();
    devices.extend([
        "-device".into(),
        "vhost-user-blk-pci-non-transitional,chardev=c0".into(),
        "-S".into(),
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", monitor.display()),
    ]);
    let qemu = w.qemu("probe=blk", &devices).spawn().expect("spawn qemu");
    let start = Instant::now();
    while !monitor.exists() {
        assert!(start.elapsed() < LIMIT, "QEMU's monitor did not appear");
        std::thread::sleep(Duration::from_millis(10));
    }
    first.kill9();
    // The image lock went with the killed process; the stale socket is replaced.
    let mut second = Backend::start(&socket, &["blk", "--disk", &disk]);
    std::thread::sleep(Duration::from_secs(2)); // reconnect=1: QEMU retries every second
    let mut mon = UnixStream::connect(&monitor).unwrap();
    mon.write_all(b"cont\n").unwrap();
    let f = wait_with_limit(qemu, LIMIT);
    assert_eq!(f.probe_ok("blk"), "disks=1 again:rw", "{}", f.describe());
    assert_eq!(&std::fs::read(&img).unwrap()[512..4608], &blk_pattern()[..]);
    second.still_serving();
}

/// The host end of the probe's vsock check: echoes on `<uds>_1234`.
fn vsock_echo(path: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
}

#[test]
fn vsock_guest_reaches_a_host_unix_socket() {
    if !qemu_available() {
        return;
    }
    let w = Work::new();
    let uds = w.path("v.sock");
    vsock_echo(&PathBuf::from(format!("{}_1234", uds.display())));
    let spec = format!("cid=3,socket={}", uds.display());
    let mut b = Backend::start(&w.path("vs.sock"), &["vsock", "--vsock", &spec]);
    let mut devices = chardev("c0", &b.socket, "").to_vec();
    devices.extend(["-device".into(), "vhost-user-vsock-pci,chardev=c0".into()]);
    let f = w.run_qemu("probe=vsock", &devices);
    assert_eq!(f.probe_ok("vsock"), "cid=3 echo=15", "{}", f.describe());
    b.still_serving();
}

#[test]
fn net_udp_echo_through_a_tap_in_a_namespace() {
    if !qemu_available() || !netns_available() {
        return;
    }
    net_echo("vunet1", "", &[]);
}

/// Two queue pairs offered; the probe's driver uses pair 0 only, so the backend must detach
/// pair 1's TAP queue (TUNSETQUEUE, under the sandbox) for frames to reach it.
#[test]
fn net_udp_echo_with_two_queue_pairs() {
    if !qemu_available() || !netns_available() {
        return;
    }
    net_echo(
        "vunet2",
        ",num_queues=4",
        &[",queues=2", ",mq=on,vectors=6"],
    );
}

/// `qemu_extra`: added to the netdev and to the device.
fn net_echo(tag: &str, extra: &str, qemu_extra: &[&str]) {
    const TAP: &str = "hpvutap0";
    const MAC: &str = "52:54:00:12:34:57";
    let w = Work::new();
    let mut ns = Netns::new(tag);
    ns.start_udp_echo();
    let spec = format!("tap={TAP},mac={MAC}{extra}");
    let mut b = Backend::start_with(
        ns.exec(hyperpool().to_str().unwrap()),
        &w.path("net.sock"),
        &["net", "--net", &spec],
    );
    let name = ns.name.clone();
    for args in [
        ["-n", &name, "addr", "add", "10.77.0.1/24", "dev", TAP].as_slice(),
        ["-n", &name, "link", "set", TAP, "up"].as_slice(),
    ] {
        assert!(ip(args), "ip {}", args.join(" "));
    }
    let mut devices = chardev("c0", &b.socket, "").to_vec();
    devices.extend([
        "-netdev".into(),
        format!(
            "vhost-user,id=n0,chardev=c0{}",
            qemu_extra.first().unwrap_or(&"")
        ),
        "-device".into(),
        format!(
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac={MAC}{}",
            qemu_extra.get(1).unwrap_or(&"")
        ),
    ]);
    let f = w.run_qemu("probe=net", &devices);
    assert_eq!(
        f.probe_ok("net"),
        format!("mac={MAC} echo=15"),
        "{}",
        f.describe()
    );
    b.still_serving();
}

#[test]
fn bad_device_options_are_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let s = socket.to_str().unwrap();
    let missing = dir.path().join("missing.img");
    let disk = format!("path={}", missing.display());
    let not_socket = dir.path().join("file");
    std::fs::write(&not_socket, b"x").unwrap();
    for (args, needle) in [
        (
            vec!["device", "blk", "--socket", s, "--disk", &disk],
            "--disk",
        ),
        (
            vec![
                "device",
                "blk",
                "--socket",
                s,
                "--disk",
                "path=x,readonly=maybe",
            ],
            "readonly",
        ),
        (
            vec![
                "device",
                "vsock",
                "--socket",
                s,
                "--vsock",
                "cid=2,socket=/x",
            ],
            "at least 3",
        ),
        (
            vec!["device", "net", "--socket", s, "--net", "tap=lo"],
            "--net tap=lo",
        ),
        (
            vec!["device", "rng", "--socket", not_socket.to_str().unwrap()],
            "not a socket",
        ),
        (vec!["device", "rng"], "required arguments"),
    ] {
        assert_refused(&run_quiet(&args), needle);
    }
}

#[test]
fn a_locked_image_or_a_live_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    image(&img);
    let disk = format!("path={}", img.display());
    let live = dir.path().join("live.sock");
    let mut first = Backend::start(&live, &["blk", "--disk", &disk]);
    let other = dir.path().join("other.sock");
    assert_refused(
        &run_quiet(&[
            "device",
            "blk",
            "--socket",
            other.to_str().unwrap(),
            "--disk",
            &disk,
        ]),
        "locked by another process",
    );
    assert!(!other.exists(), "nothing bound after a refusal");
    assert_refused(
        &run_quiet(&["device", "rng", "--socket", live.to_str().unwrap()]),
        "another process is listening",
    );
    first.still_serving();
}
