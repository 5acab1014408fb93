//! `hyperpool vmm --api-socket`: a VM process driven through Cloud Hypervisor's REST API, on
//! real KVM with the probe guest, checked through the API and the guest's console log.

mod common;

use common::vmm::{Vmm, probe_config, wait_log};

use std::process::{Command, Stdio};
use std::time::Duration;

use hyperpool_api::client::{Client, Request};
use serde_json::{Value, json};

#[test]
fn lifecycle_through_the_api() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let vmm = Vmm::start(dir.path());

    let ping: Value = vmm.api.get("/api/v1/vmm.ping").unwrap().json().unwrap();
    assert_eq!(ping["pid"], json!(vmm.child.id()));
    assert_eq!(vmm.api.get("/api/v1/vm.info").unwrap().status, 404);
    assert_eq!(vmm.put("vm.boot", None).status, 404);

    vmm.ok(
        "vm.create",
        Some(probe_config(
            dir.path(),
            "probe=cmdline,cpus probe.end=halt",
        )),
    );
    assert_eq!(vmm.state(), "Created");
    let again = vmm.put("vm.create", Some(probe_config(dir.path(), "")));
    assert_eq!(again.status, 409, "{}", again.text());

    vmm.ok("vm.boot", None);
    assert_eq!(vmm.state(), "Running");
    let text = wait_log(&log, "PROBE done", 1);
    assert!(text.contains("PROBE cpus ok madt=2 up=2"), "{text}");

    // Wrong-state actions are refused and change nothing.
    let r = vmm.put("vm.resume", None);
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(r.text().contains("Running"), "{}", r.text());
    // Hotplug input is checked before anything is added (tests/vmm_hotplug.rs does the rest).
    let r = vmm.put("vm.add-disk", Some(json!({"path": "/nonexistent"})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("/nonexistent"), "{}", r.text());
    assert_eq!(vmm.state(), "Running");

    vmm.ok("vm.pause", None);
    assert_eq!(vmm.state(), "Paused");
    vmm.ok("vm.resume", None);
    assert_eq!(vmm.state(), "Running");

    let counters: Value = vmm.api.get("/api/v1/vm.counters").unwrap().json().unwrap();
    assert!(
        counters["vcpu0"]["pio_exits"].as_u64().unwrap() > 0,
        "{counters}"
    );
    assert_eq!(counters["vm"]["boots"], json!(1), "{counters}");

    // A reboot builds the VM again: the guest runs a second time.
    vmm.ok("vm.reboot", None);
    wait_log(&log, "PROBE done", 2);
    assert_eq!(vmm.state(), "Running");
    let counters: Value = vmm.api.get("/api/v1/vm.counters").unwrap().json().unwrap();
    assert_eq!(counters["vm"]["boots"], json!(2), "{counters}");

    vmm.ok("vm.shutdown", None);
    assert_eq!(vmm.state(), "Shutdown");
    vmm.ok("vm.boot", None);
    wait_log(&log, "PROBE done", 3);
    vmm.ok("vm.delete", None);
    assert_eq!(vmm.api.get("/api/v1/vm.info").unwrap().status, 404);

    vmm.ok("vmm.shutdown", None);
    let socket = vmm.socket.clone();
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
    assert!(!socket.exists(), "the API socket is removed");
}

#[test]
fn disk_counters_through_the_api() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let vmm = Vmm::start(dir.path());
    let mut cfg = probe_config(dir.path(), "probe=blk probe.end=halt");
    cfg["disks"] = json!([{"path": image}]);
    vmm.ok("vm.create", Some(cfg));
    vmm.ok("vm.boot", None);
    let text = wait_log(&dir.path().join("console.log"), "PROBE done", 1);
    assert!(text.contains("PROBE blk ok"), "{text}");

    // The probe wrote 8 sectors, flushed and read them back.
    let counters: Value = vmm.api.get("/api/v1/vm.counters").unwrap().json().unwrap();
    let disk = &counters["disk0"];
    let get = |name: &str| {
        disk[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no disk0.{name}: {counters}"))
    };
    assert!(get("write_bytes") >= 4096, "{counters}");
    assert!(get("read_bytes") >= 4096, "{counters}");
    assert!(get("write_ops") > 0, "{counters}");
    assert!(get("read_ops") > 0, "{counters}");
    assert!(get("flush_ops") > 0, "{counters}");
    assert_eq!(get("errors"), 0, "{counters}");
    assert!(
        counters["vcpu0"]["exits"].as_u64().unwrap() > 0,
        "{counters}"
    );

    // A reboot builds the devices again: their counts start over with the new boot.
    vmm.ok("vm.reboot", None);
    wait_log(&dir.path().join("console.log"), "PROBE done", 2);
    let again: Value = vmm.api.get("/api/v1/vm.counters").unwrap().json().unwrap();
    assert_eq!(again["disk0"], counters["disk0"], "{again}");
    vmm.ok("vmm.shutdown", None);
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}

#[test]
fn a_guest_poweroff_ends_the_process() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(dir.path());
    vmm.ok(
        "vm.create",
        Some(probe_config(dir.path(), "probe=cmdline probe.end=poweroff")),
    );
    vmm.ok("vm.boot", None);
    assert_eq!(vmm.wait_exit(Duration::from_secs(60)), 0);
    let log = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(log.contains("PROBE done"), "{log}");
}

#[test]
fn bad_requests_name_what_is_wrong() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vmm = Vmm::start(dir.path());
    let cases = [
        (
            json!({"payload": {}, "memory": {"size": 67108864, "hugepages": true}}),
            "memory.hugepages",
        ),
        (
            json!({"payload": {}, "cpus": {"boot_vcpus": 1, "max_vcpus": 2}}),
            "cpus.max_vcpus",
        ),
        (
            json!({"payload": {}, "disks": [{"path": "/a", "vhost_user": true, "vhost_socket": "/s"}]}),
            "disks[0]`: path does not go with vhost_user",
        ),
        (json!({"payload": {}, "frobnicate": 1}), "frobnicate"),
        (json!({"payload": {}, "memory": {"size": 4096}}), "--memory"),
    ];
    for (body, needle) in cases {
        let r = vmm.put("vm.create", Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.text().contains(needle), "{body}: {}", r.text());
        assert_eq!(r.text().lines().count(), 1, "one line: {}", r.text());
    }
    let r = vmm
        .api
        .request("PUT", "/api/v1/vm.create", Some(b"{not json".to_vec()))
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().starts_with("invalid request body"), "{}", r.text());
    let r = vmm.put("vm.snapshot", Some(json!({})));
    assert_eq!(r.status, 404);
    assert!(
        r.text().contains("not supported by Hyperpool yet"),
        "{}",
        r.text()
    );
    let r = vmm.api.get("/api/v1/vm.boot").unwrap();
    assert_eq!(r.status, 405, "{}", r.text());
    // Requests in order on one connection stop at the first refusal: the boot is not sent.
    let answers = vmm
        .api
        .in_order(create_then_boot(
            br#"{"payload": {}, "frobnicate": 1}"#.to_vec(),
        ))
        .unwrap();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].status, 400, "{}", answers[0].text());
    // Nothing was created by the refused requests.
    assert_eq!(vmm.api.get("/api/v1/vm.info").unwrap().status, 404);
}

/// `--api-fd`: the socket is bound (and listening) before the VMM runs, as the pool daemon does
/// it, so the first request needs no waiting for the API to come up.
#[test]
fn an_inherited_api_socket_takes_requests_at_once() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let child = Command::new(common::hyperpool())
        .args(["vmm", "--api-fd", "0", "--api-socket"])
        .arg(&socket)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let vmm = Vmm {
        child,
        api: Client::new(&socket).with_timeout(Duration::from_secs(20)),
        socket: socket.clone(),
    };
    // No ping first: the requests wait in the socket's backlog until the VMM serves them. Both
    // go on one connection, as the daemon sends them.
    let create = probe_config(dir.path(), "probe=cmdline,cpus").to_string();
    let answers = vmm
        .api
        .in_order(create_then_boot(create.into_bytes()))
        .unwrap();
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [204, 204], "{answers:?}");
    wait_log(&dir.path().join("console.log"), "PROBE done", 1);
    vmm.ok("vmm.shutdown", None);
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
    assert!(!socket.exists(), "the API socket is removed");
}

#[test]
fn a_wrong_api_fd_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let elsewhere = std::os::unix::net::UnixListener::bind(dir.path().join("other.sock")).unwrap();
    let cases: [(Stdio, &str); 3] = [
        (
            Stdio::null(),
            "not a listening socket bound to --api-socket",
        ),
        (
            Stdio::from(std::os::fd::OwnedFd::from(elsewhere)),
            "not a listening socket bound to --api-socket",
        ),
        (Stdio::null(), "not an open file descriptor"),
    ];
    for (i, (stdin, needle)) in cases.into_iter().enumerate() {
        let fd = if i == 2 { "1000" } else { "0" };
        let out = Command::new(common::hyperpool())
            .args(["vmm", "--api-fd", fd, "--api-socket"])
            .arg(&socket)
            .stdin(stdin)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {err}");
        assert!(err.contains(needle), "case {i}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "case {i}: {err}");
    }
}

/// `vm.create` with `config`, then `vm.boot`: what the pool daemon sends on one connection.
fn create_then_boot(config: Vec<u8>) -> Vec<Request<'static>> {
    vec![
        Request {
            method: "PUT",
            path: "/api/v1/vm.create",
            body: Some(config),
        },
        Request {
            method: "PUT",
            path: "/api/v1/vm.boot",
            body: None,
        },
    ]
}
