//! Hyperpool as a vhost-user frontend: the probe guest's virtio-blk check against a disk served
//! by another process over vhost-user, with QEMU's `qemu-storage-daemon` as an independent
//! backend and ours (`hyperpool device blk`). The pattern the probe writes is on the host image
//! afterwards; a read-only export reaches the guest as VIRTIO_BLK_F_RO; a backend killed with
//! SIGKILL while the VM runs leaves the VMM up and its API answering, and a backend started
//! again on the socket is reconnected (mid-I/O: the driver's reset recovers the device); a
//! socket nobody serves is one line and exit 2; a vhost-user disk can be hot-added to a VM with
//! shared memory.
//!
//! The backend is a parameter ([`Backend`]): any program that serves vhost-user-blk for an
//! image on a socket can be run through the same tests.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::vmm::{probe_config, wait_log};
use common::*;
use hyperpool_api::client::Client;
use serde_json::{Value, json};

const IMAGE_SIZE: u64 = 16 << 20;
const QSD: &str = "/usr/bin/qemu-storage-daemon";

/// How to start a vhost-user-blk backend for `image` on `socket` (`writable`: may the guest
/// write).
type Backend = fn(image: &Path, socket: &Path, writable: bool) -> Command;

fn qemu_storage_daemon(image: &Path, socket: &Path, writable: bool) -> Command {
    let mut c = Command::new(QSD);
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={}",
            socket.display(),
            if writable { "on" } else { "off" }
        ));
    c
}

/// Ours: `hyperpool device blk`, so a Hyperpool VM with its disk in a process of its own.
fn hyperpool_device(image: &Path, socket: &Path, writable: bool) -> Command {
    let mut c = Command::new(hyperpool());
    c.args(["device", "blk", "--socket"]).arg(socket);
    c.arg("--disk").arg(format!(
        "path={}{}",
        image.display(),
        if writable { "" } else { ",readonly=on" }
    ));
    c
}

/// False (skip) when QEMU's storage daemon is not installed, unless CI=true.
fn qsd_available() -> bool {
    if Path::new(QSD).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{QSD} is missing on a CI machine (package qemu-system-common)");
    }
    eprintln!("skipping: {QSD} is missing");
    false
}

/// A running backend process, killed when dropped.
struct Running {
    child: Child,
}

impl Running {
    /// Starts `backend` and waits until its socket accepts connections.
    fn start(backend: Backend, image: &Path, socket: &Path, writable: bool) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = backend(image, socket, writable)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the vhost-user backend");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the backend never made its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image(dir: &Path, fill: u8) -> PathBuf {
    let path = dir.join("disk.raw");
    std::fs::write(&path, vec![fill; IMAGE_SIZE as usize]).unwrap();
    path
}

/// What the probe writes at LBA 1..=8.
fn pattern() -> Vec<u8> {
    let mut buf = vec![b'.'; 8 * 512];
    for (i, sector) in buf.chunks_exact_mut(512).enumerate() {
        let text = format!("HYPERPOOL-PROBE-{}", i + 1);
        sector[..text.len()].copy_from_slice(text.as_bytes());
    }
    buf
}

fn vhost_disk(socket: &Path) -> String {
    format!("vhost_user=true,socket={}", socket.display())
}

/// The probe's blk check on the one disk `disk` (a `--disk` spec).
fn run_probe_blk(disk: &str) -> Finished {
    run(
        &[
            "run",
            "--serial",
            "tty",
            "--cmdline",
            "probe=blk",
            "--disk",
            disk,
        ],
        PROBE_LIMIT,
    )
}

fn probe_blk_through(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 0);
    let socket = dir.path().join("blk.sock");
    let _b = Running::start(backend, &img, &socket, true);
    let disk = vhost_disk(&socket);
    let f = run_probe_blk(&disk);
    let figures = f.probe_ok("blk");
    assert!(
        figures.starts_with("disks=1 ") && figures.ends_with(":rw"),
        "{}",
        f.describe()
    );
    assert!(
        f.stderr.contains("vhost-user blk: backend at"),
        "{}",
        f.describe()
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[512..512 + 8 * 512], pattern().as_slice());
    assert!(bytes[..512].iter().all(|&b| b == 0), "LBA 0 untouched");
}

fn probe_blk_readonly_through(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 0x33);
    let socket = dir.path().join("blk.sock");
    let _b = Running::start(backend, &img, &socket, false);
    let disk = vhost_disk(&socket);
    let f = run_probe_blk(&disk);
    // The probe's check passes on a read-only disk only if the device said VIRTIO_BLK_F_RO and
    // the write was refused.
    let figures = f.probe_ok("blk");
    assert!(figures.ends_with(":ro"), "{}", f.describe());
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes.iter().all(|&b| b == 0x33), "the image is untouched");
}

#[test]
fn probe_blk_via_qemu_storage_daemon() {
    if kvm_available() && qsd_available() {
        probe_blk_through(qemu_storage_daemon);
    }
}

#[test]
fn probe_blk_via_hyperpool_device() {
    if kvm_available() {
        probe_blk_through(hyperpool_device);
    }
}

#[test]
fn readonly_export_is_a_readonly_disk() {
    if kvm_available() && qsd_available() {
        probe_blk_readonly_through(qemu_storage_daemon);
    }
}

#[test]
fn readonly_hyperpool_device_is_a_readonly_disk() {
    if kvm_available() {
        probe_blk_readonly_through(hyperpool_device);
    }
}

fn get(api: &Client, endpoint: &str) -> Value {
    let r = api.get(&format!("/api/v1/{endpoint}")).unwrap();
    assert_eq!(r.status, 200, "{endpoint}: {}", r.text());
    r.json().unwrap()
}

/// Polls `vm.counters` until `disk0.<name>` is `want`.
fn wait_counter(api: &Client, name: &str, want: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = get(api, "vm.counters");
        if c["disk0"][name].as_u64() == Some(want) {
            return c;
        }
        assert!(Instant::now() < deadline, "disk0.{name} never {want}: {c}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn backend_death_and_return(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 0);
    let socket = dir.path().join("blk.sock");
    let mut b = Running::start(backend, &img, &socket, true);

    let api_socket = dir.path().join("api.sock");
    let vmm_log = dir.path().join("vmm.log");
    let mut vmm = Command::new(hyperpool())
        .args(["vmm", "--api-socket"])
        .arg(&api_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&vmm_log).unwrap())
        .spawn()
        .unwrap();
    let api = Client::new(&api_socket).with_timeout(Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get("/api/v1/vmm.ping").is_err() {
        assert!(Instant::now() < deadline, "the API never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let put = |endpoint: &str, body: Option<Value>| {
        let r = api
            .put(&format!("/api/v1/{endpoint}"), body.as_ref())
            .unwrap();
        assert_eq!(r.status, 204, "{endpoint}: {}", r.text());
    };
    let mut cfg = probe_config(dir.path(), "probe=blk probe.end=halt");
    cfg["disks"] = json!([{"vhost_user": true, "vhost_socket": socket}]);
    put("vm.create", Some(cfg));
    put("vm.boot", None);
    let console = wait_log(&dir.path().join("console.log"), "PROBE done", 1);
    assert!(console.contains("PROBE blk ok"), "{console}");
    let c = wait_counter(&api, "connected", 1);
    assert!(c["disk0"]["interrupts"].as_u64().unwrap() > 0, "{c}");
    let info = get(&api, "vm.info");
    assert_eq!(
        info["config"]["disks"][0]["vhost_user"],
        json!(true),
        "{info}"
    );

    b.kill9();
    let c = wait_counter(&api, "disconnects", 1);
    assert_eq!(c["disk0"]["connected"], json!(0), "{c}");
    let log = std::fs::read_to_string(&vmm_log).unwrap();
    let lost: Vec<_> = log.lines().filter(|l| l.contains("hung up")).collect();
    assert_eq!(lost.len(), 1, "logged once:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(vmm.try_wait().unwrap().is_none(), "the VMM is still up");
    assert_eq!(get(&api, "vm.info")["state"], json!("Running"));

    // The backend comes back on the same socket: the frontend finds it and hands it the rings.
    let _b = Running::start(backend, &img, &socket, true);
    let c = wait_counter(&api, "reconnects", 1);
    assert_eq!(c["disk0"]["connected"], json!(1), "{c}");
    let log = std::fs::read_to_string(&vmm_log).unwrap();
    assert!(log.contains("): reconnected"), "{log}");

    put("vm.shutdown", None);
    put("vmm.shutdown", None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while vmm.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the VMM did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn backend_killed_while_the_vm_runs() {
    if kvm_available() && qsd_available() {
        backend_death_and_return(qemu_storage_daemon);
    }
}

#[test]
fn hyperpool_device_killed_while_the_vm_runs() {
    if kvm_available() {
        backend_death_and_return(hyperpool_device);
    }
}

/// A VM started with shared memory takes a vhost-user disk by hotplug; the backend is
/// connected when the request answers.
fn hot_add(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 0);
    let socket = dir.path().join("blk.sock");
    let _b = Running::start(backend, &img, &socket, true);
    let vmm = common::vmm::Vmm::start(dir.path());
    let mut cfg = probe_config(dir.path(), "probe=cmdline probe.end=halt");
    cfg["memory"]["shared"] = json!(true);
    vmm.ok("vm.create", Some(cfg));
    vmm.ok("vm.boot", None);
    wait_log(&dir.path().join("console.log"), "PROBE done", 1);
    let r = vmm.put(
        "vm.add-disk",
        Some(json!({"vhost_user": true, "vhost_socket": socket, "id": "vu0"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let c = get(&vmm.api, "vm.counters");
    assert_eq!(c["disk0"]["connected"], json!(1), "{c}");
    let info = get(&vmm.api, "vm.info");
    assert_eq!(
        info["config"]["disks"][0]["vhost_socket"],
        json!(socket),
        "{info}"
    );
}

#[test]
fn vhost_user_disk_by_hotplug() {
    if kvm_available() && qsd_available() {
        hot_add(qemu_storage_daemon);
    }
}

#[test]
fn hyperpool_device_disk_by_hotplug() {
    if kvm_available() {
        hot_add(hyperpool_device);
    }
}

/// The backend dies in the middle of the probe's write benchmark and a new one takes the socket.
/// qemu-storage-daemon keeps no in-flight record (protocol feature INFLIGHT_SHMFD), so which
/// requests it had taken is unknown: the frontend reconnects but leaves the rings to the
/// driver (DEVICE_NEEDS_RESET). The benchmark's unacknowledged requests stay unacknowledged
/// (never completed twice, never reported done when they were not); the probe's next check
/// resets the device, which then works on the new backend and writes its pattern.
fn backend_death_mid_io(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let socket = dir.path().join("blk.sock");
    let mut b = Running::start(backend, &img, &socket, true);
    // The benchmark's queues are 256 long.
    let disk = format!("{},queue_size=256", vhost_disk(&socket));
    let child = command(&[
        "run",
        "--serial",
        "tty",
        "--cmdline",
        "probe=bench-blk,blk bench.ms=3000 bench.blk.mib=32",
        "--disk",
        &disk,
    ])
    .spawn()
    .unwrap();
    // Phase 1 (sequential writes) runs from boot (milliseconds) to 3 s.
    std::thread::sleep(Duration::from_millis(1200));
    b.kill9();
    std::thread::sleep(Duration::from_millis(200));
    let _b = Running::start(backend, &img, &socket, true);
    let f = wait_with_limit(child, PROBE_LIMIT);
    assert_eq!(f.code(), 0, "{}", f.describe());
    let bench = f.probe_line("bench-blk").unwrap_or_default();
    assert!(
        bench.contains("seqwrite1m") && bench.contains("still in flight"),
        "{}",
        f.describe()
    );
    f.probe_ok("blk");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[512..512 + 8 * 512], pattern().as_slice());
    let lost = "the backend hung up; reconnecting";
    assert_eq!(f.stderr.matches(lost).count(), 1, "{}", f.describe());
    assert_eq!(
        f.stderr.matches("keeps no in-flight record").count(),
        1,
        "{}",
        f.describe()
    );
    assert!(!f.stderr.contains("rings resumed"), "{}", f.describe());
}

#[test]
fn backend_killed_mid_io_then_the_driver_reset_recovers() {
    if kvm_available() && qsd_available() {
        backend_death_mid_io(qemu_storage_daemon);
    }
}

#[test]
fn hyperpool_device_killed_mid_io_then_the_driver_reset_recovers() {
    if kvm_available() {
        backend_death_mid_io(hyperpool_device);
    }
}

#[test]
fn bad_vhost_user_input_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.sock");
    let disk = vhost_disk(&missing);
    let f = run_quiet(&["run", "--cmdline", "probe=blk", "--disk", &disk]);
    assert_refused(&f, &missing.display().to_string());
    assert!(f.stderr.contains("cannot connect"), "{}", f.describe());

    // A socket file nobody listens on any more.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let disk = vhost_disk(&stale);
    let f = run_quiet(&["run", "--cmdline", "probe=blk", "--disk", &disk]);
    assert_refused(&f, "Connection refused");

    let f = run_quiet(&["run", "--disk", &format!("{disk},path=/tmp/x.raw")]);
    assert_refused(&f, "path= does not go with vhost_user=true");
    let f = run_quiet(&["run", "--net", &format!("{disk},tap=t0")]);
    assert_refused(&f, "tap= does not go with vhost_user=true");
    let f = run_quiet(&["run", "--disk", "vhost_user=true"]);
    assert_refused(&f, "needs socket=PATH");
}

/// The probe's UDP echo with its network card served out of process: `hyperpool device net` on
/// a TAP inside a test namespace, the VMM (outside it) as the vhost-user frontend.
#[test]
fn probe_udp_echo_through_hyperpool_device_net() {
    use common::netns::{Netns, ip, netns_available};
    if !kvm_available() || !netns_available() {
        return;
    }
    const TAP: &str = "hpvunet0";
    const MAC: &str = "52:54:00:12:34:57";
    let mut ns = Netns::new("vunet");
    ns.start_udp_echo();
    for args in [
        ["tuntap", "add", "dev", TAP, "mode", "tap"].as_slice(),
        ["addr", "add", "10.77.0.1/24", "dev", TAP].as_slice(),
        ["link", "set", TAP, "up"].as_slice(),
    ] {
        let mut full = vec!["-n", ns.name.as_str()];
        full.extend_from_slice(args);
        assert!(ip(&full), "ip {}", full.join(" "));
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let backend = ns
        .exec(hyperpool().to_str().unwrap())
        .args(["device", "net", "--socket"])
        .arg(&socket)
        .args(["--net", &format!("tap={TAP},mac={MAC}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hyperpool device net");
    let _backend = Running { child: backend };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the backend never made its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let net = format!("vhost_user=true,socket={},mac={MAC}", socket.display());
    let out = run(
        &[
            "run",
            "--serial",
            "tty",
            "--cmdline",
            "probe=net",
            "--net",
            &net,
        ],
        PROBE_LIMIT,
    );
    assert_eq!(out.code(), 0, "{}", out.describe());
    assert_eq!(
        out.probe_ok("net"),
        format!("mac={MAC} echo=15"),
        "{}",
        out.describe()
    );
}

/// `hyperpool run --device-processes`: the disk is served by a `hyperpool device blk` child;
/// the probe's pattern reaches the image, and the child and its socket are gone afterwards.
#[test]
fn run_with_device_processes() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 0);
    let disk = format!("path={}", img.display());
    let f = run(
        &[
            "run",
            "--serial",
            "tty",
            "--cmdline",
            "probe=blk",
            "--device-processes",
            "--disk",
            &disk,
        ],
        PROBE_LIMIT,
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
    assert!(f.probe_ok("blk").ends_with(":rw"), "{}", f.describe());
    assert!(f.stderr.contains("blk device process"), "{}", f.describe());
    let data = std::fs::read(&img).unwrap();
    assert_eq!(&data[512..512 + 8 * 512], pattern().as_slice());
    let pid = f
        .stderr
        .split("blk device process ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse::<u32>().ok())
        .expect("the device process's pid in the log");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "device process {pid} outlived the VMM"
    );
}
