//! Device hotplug into a running VM through the per-VM API (`vm.add-disk`, `vm.remove-device`),
//! on real KVM with the probe's `hotplug` check as the guest's hotplug driver: it sees the slot
//! appear (GED interrupt, the controller's slots-up bitmap), drives the new virtio-blk, and
//! ejects the slot when asked to.

mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::vmm::{Vmm, probe_config, wait_log};
use serde_json::{Value, json};

/// Waits until the console log has a line starting with `prefix`; returns that line.
fn wait_line(log: &Path, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
            return line.trim_end().to_string();
        }
        assert!(Instant::now() < deadline, "no '{prefix}...' in:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn info(vmm: &Vmm) -> Value {
    let r = vmm.api.get("/api/v1/vm.info").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

fn disk_ids(vmm: &Vmm) -> Vec<String> {
    info(vmm)["config"]["disks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| d["id"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` has `file` open.
fn holds(pid: u32, file: &Path) -> bool {
    let file = file.canonicalize().unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|target| target == file)
}

/// Whether an exclusive flock on `file` is free (the VMM locks the images it uses).
fn lock_is_free(file: &Path) -> bool {
    let f = std::fs::File::open(file).unwrap();
    // SAFETY: flock on a descriptor we own; released when `f` is closed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn image(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    path
}

fn has_pattern(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    (1..=8).all(|lba| {
        let want = format!("HYPERPOOL-PROBE-{lba}");
        bytes[lba * 512..].starts_with(want.as_bytes())
    })
}

#[test]
fn a_disk_is_hot_plugged_used_and_ejected() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let img = image(dir.path(), "hot.raw");
    let vmm = Vmm::start(dir.path());
    let pid = vmm.child.id();
    let mut cfg = probe_config(dir.path(), "probe=hotplug");
    cfg["cpus"] = json!({"boot_vcpus": 1, "max_vcpus": 1});
    vmm.ok("vm.create", Some(cfg));
    vmm.ok("vm.boot", None);
    wait_log(&log, "PROBE hotplug ready", 1);

    let r = vmm.put("vm.add-disk", Some(json!({"path": img, "id": "hot0"})));
    assert_eq!(r.status, 200, "{}", r.text());
    let added: Value = r.json().unwrap();
    assert_eq!(added, json!({"id": "hot0", "bdf": "0000:00:01.0"}));
    let line = wait_line(&log, "PROBE hotplug ok slot=1 ");
    assert!(line.ends_with(":rw"), "{line}");
    assert!(has_pattern(&img), "the guest's writes are in the image");
    assert_eq!(disk_ids(&vmm), ["hot0"]);
    assert!(holds(pid, &img) && !lock_is_free(&img));

    // Counters, pause and resume work with the added device.
    let counters: Value = vmm.api.get("/api/v1/vm.counters").unwrap().json().unwrap();
    assert!(
        counters["disk0"]["write_ops"].as_u64().unwrap() > 0,
        "{counters}"
    );
    vmm.ok("vm.pause", None);
    assert_eq!(vmm.state(), "Paused");
    vmm.ok("vm.resume", None);

    vmm.ok("vm.remove-device", Some(json!({"id": "hot0"})));
    wait_line(&log, "PROBE hotplug ejected slot=1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !disk_ids(&vmm).is_empty() {
        assert!(Instant::now() < deadline, "{}", info(&vmm));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!holds(pid, &img), "the VMM closed the image");
    assert!(lock_is_free(&img), "and its lock is gone");
    let counters: Value = vmm.api.get("/api/v1/vm.counters").unwrap().json().unwrap();
    assert!(counters.get("disk0").is_none(), "{counters}");
    let r = vmm.put("vm.remove-device", Some(json!({"id": "hot0"})));
    assert_eq!(r.status, 404, "{}", r.text());

    // The freed slot takes the next disk, with an id made up as Cloud Hypervisor does.
    let second = image(dir.path(), "second.raw");
    let r = vmm.put("vm.add-disk", Some(json!({"path": second})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json::<Value>().unwrap(),
        json!({"id": "_disk0", "bdf": "0000:00:01.0"})
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.matches("PROBE hotplug ok slot=1 ").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no second device check:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(has_pattern(&second));

    // The power button ends the check with the totals, and the guest powers off.
    vmm.ok("vm.power-button", None);
    assert_eq!(vmm.wait_exit(Duration::from_secs(60)), 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("PROBE hotplug ok plugged=2 ejected=1"),
        "{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn bad_hotplug_requests_change_nothing() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let img = image(dir.path(), "a.raw");
    let vmm = Vmm::start(dir.path());
    let mut cfg = probe_config(dir.path(), "probe=hotplug");
    cfg["cpus"] = json!({"boot_vcpus": 1, "max_vcpus": 1});
    cfg["disks"] = json!([{"path": img, "id": "boot0"}]);
    vmm.ok("vm.create", Some(cfg));
    vmm.ok("vm.boot", None);
    wait_log(&log, "PROBE hotplug ready", 1);

    let other = image(dir.path(), "b.raw");
    let cases = [
        (
            json!({"path": dir.path().join("missing.raw")}),
            400,
            "missing.raw",
        ),
        (json!({"path": other, "id": "boot0"}), 409, "boot0"),
        (json!({"path": other, "id": ""}), 400, "id"),
        (json!({"path": img, "id": "again"}), 400, "a.raw"),
        (
            json!({"path": other, "vhost_user": true}),
            400,
            "vhost_user",
        ),
        // The VM's memory is private: no backend could map it.
        (
            json!({"vhost_user": true, "vhost_socket": dir.path().join("vu.sock")}),
            400,
            "shared guest memory",
        ),
        (json!({"id": "nopath"}), 400, "path"),
    ];
    for (body, status, needle) in cases {
        let r = vmm.put("vm.add-disk", Some(body.clone()));
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.text().contains(needle), "{body}: {}", r.text());
        assert_eq!(r.text().lines().count(), 1, "one line: {}", r.text());
    }
    let r = vmm.put("vm.add-net", Some(json!({"tap": "x".repeat(40)})));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = vmm.put("vm.remove-device", Some(json!({"id": "nothing"})));
    assert_eq!(r.status, 404, "{}", r.text());

    // The VM runs on, answers, and has exactly the device it booted with; the guest saw no
    // hotplug event, and the refused image is not held.
    assert_eq!(vmm.state(), "Running");
    assert_eq!(disk_ids(&vmm), ["boot0"]);
    assert!(lock_is_free(&other));
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("PROBE hotplug ok slot"), "{text}");

    // A boot-time disk can be removed too, once the guest ejects it.
    vmm.ok("vm.remove-device", Some(json!({"id": "boot0"})));
    wait_line(&log, "PROBE hotplug ejected slot=1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !disk_ids(&vmm).is_empty() {
        assert!(Instant::now() < deadline, "{}", info(&vmm));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(lock_is_free(&img));
    vmm.ok("vmm.shutdown", None);
    assert_eq!(vmm.wait_exit(Duration::from_secs(10)), 0);
}
