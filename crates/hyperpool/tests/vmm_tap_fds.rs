//! TAP fds passed over the API socket as SCM_RIGHTS, as Kata Containers passes them to Cloud
//! Hypervisor: the test opens the TAP itself (inside a network namespace it creates), sends
//! `vm.create` / `vm.add-net` with the fd attached, and the probe's `net` check gets its UDP
//! echo through it; a NIC hot-added the same way appears on the guest's bus. As root with `ip`
//! and python3 (else skipped unless CI=true), like `virtio_net.rs`.

mod common;

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::{Netns, ip, netns_available};
use common::vmm::{Vmm, probe_config, wait_log};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Value, json};

const TAP: &str = "hpfd0";
const MAC: &str = "52:54:00:12:34:57";
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Opens (creating) TAP `name` inside `ns`, from a thread that joins the namespace, as a
/// container runtime does; the fd stays tied to that namespace.
fn open_tap_in(ns: &Netns, name: &str) -> OwnedFd {
    let path = format!("/var/run/netns/{}", ns.name);
    let name = name.to_owned();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a namespace fd we opened; it moves only this thread.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        ifr[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq that `ifr` provides.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        OwnedFd::from(tun)
    })
    .join()
    .unwrap()
}

/// Gives the TAP 10.77.0.1/24 and runs a UDP echo server on it in `ns`.
fn echo_server(ns: &mut Netns) {
    for args in [
        ["-n", &ns.name, "addr", "add", "10.77.0.1/24", "dev", TAP].as_slice(),
        ["-n", &ns.name, "link", "set", TAP, "up"].as_slice(),
    ] {
        assert!(ip(args), "ip {}", args.join(" "));
    }
    ns.start_udp_echo();
}

/// One HTTP request on the API socket with `fds` attached to its bytes (SCM_RIGHTS); returns
/// the status and body.
fn request_with_fds(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: &Value,
    fds: &[&OwnedFd],
) -> (u16, String) {
    let body = body.to_string();
    let head = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [IoSlice::new(head.as_bytes()), IoSlice::new(body.as_bytes())];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    assert_eq!(sent, head.len() + body.len());
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let text = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, text)
}

/// How many descriptors process `pid` has open on `what`.
fn holds(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy() == what)
        .count()
}

#[test]
fn probe_udp_echo_over_a_tap_fd_passed_with_vm_create() {
    if !common::kvm_available() || !netns_available() {
        return;
    }
    let mut ns = Netns::new("fds");
    let tap = open_tap_in(&ns, TAP);
    echo_server(&mut ns);
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(dir.path());

    // Sent with a request that takes no fds: closed by the VMM, not kept.
    let stray = dir.path().join("stray");
    std::fs::write(&stray, b"x").unwrap();
    let stray_fd = OwnedFd::from(std::fs::File::open(&stray).unwrap());
    let (status, _) = request_with_fds(&vmm.socket, "GET", "vmm.ping", &json!(null), &[&stray_fd]);
    assert_eq!(status, 200);
    let stray_path = stray.canonicalize().unwrap();
    assert_eq!(holds(vmm.child.id(), &stray_path.to_string_lossy()), 0);

    // fds named in the body but none sent: refused, nothing created.
    let mut cfg = probe_config(dir.path(), "probe=net");
    cfg["net"] = json!([{"fds": [3], "mac": MAC}]);
    let (status, text) = request_with_fds(&vmm.socket, "PUT", "vm.create", &cfg, &[]);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("SCM_RIGHTS"), "{text}");

    let (status, text) = request_with_fds(&vmm.socket, "PUT", "vm.create", &cfg, &[&tap]);
    assert_eq!(status, 204, "{text}");
    drop(tap);
    let info: Value = vmm.api.get("/api/v1/vm.info").unwrap().json().unwrap();
    let fds = info["config"]["net"][0]["fds"].as_array().unwrap().clone();
    assert_eq!(fds.len(), 1, "{info}");
    vmm.ok("vm.boot", None);
    assert_eq!(vmm.wait_exit(Duration::from_secs(120)), 0);
    let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(
        log.contains(&format!("PROBE net ok mac={MAC} echo=15")),
        "{log}"
    );
}

#[test]
fn a_nic_hot_added_with_a_tap_fd_appears_on_the_guest_bus() {
    if !common::kvm_available() || !netns_available() {
        return;
    }
    let ns = Netns::new("hotnet");
    let tap = open_tap_in(&ns, TAP);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let vmm = Vmm::start(dir.path());
    let mut cfg = probe_config(dir.path(), "probe=hotplug");
    cfg["cpus"] = json!({"boot_vcpus": 1, "max_vcpus": 1});
    vmm.ok("vm.create", Some(cfg));
    vmm.ok("vm.boot", None);
    wait_log(&log, "PROBE hotplug ready", 1);

    // Two fds for one queue pair: refused, and both closed.
    let extra = open_tap_in(&ns, "hpfd1");
    let body = json!({"id": "nic0", "num_queues": 2});
    let (status, text) = request_with_fds(&vmm.socket, "PUT", "vm.add-net", &body, &[&tap, &extra]);
    assert_eq!(status, 400, "{text}");
    assert_eq!(holds(vmm.child.id(), "/dev/net/tun"), 0);

    let (status, text) = request_with_fds(&vmm.socket, "PUT", "vm.add-net", &body, &[&tap]);
    assert_eq!(status, 200, "{text}");
    let added: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(added, json!({"id": "nic0", "bdf": "0000:00:01.0"}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("PROBE hotplug ok slot=1 1af4:1041") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no virtio-net on slot 1:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(holds(vmm.child.id(), "/dev/net/tun") >= 1);

    vmm.ok("vm.remove-device", Some(json!({"id": "nic0"})));
    let deadline = Instant::now() + Duration::from_secs(30);
    while holds(vmm.child.id(), "/dev/net/tun") > 0 {
        assert!(Instant::now() < deadline, "the VMM still holds the TAP");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest says so once the slot reads empty, which is after the VMM let go.
    wait_log(&log, "PROBE hotplug ejected slot=1", 1);
    vmm.ok("vmm.shutdown", None);
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}
