//! virtio-net end to end: the probe guest (virtio-drivers' net driver) ARPs and exchanges a UDP
//! echo with a server on the host side of a TAP that the VMM creates — all inside a network
//! namespace the test creates and removes, so no traffic touches the host's own interfaces.

mod common;

use common::netns::*;
use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

const TAP: &str = "hptap0";
const MAC: &str = "52:54:00:12:34:56";

/// Waits for the VMM to create the TAP in `ns`, then gives it 10.77.0.1/24 and brings it up.
fn configure_tap(ns: &Netns, limit: Duration) -> Result<(), String> {
    let ns = ns.name.as_str();
    let start = Instant::now();
    while !ip(&["-n", ns, "link", "show", TAP]) {
        if start.elapsed() > limit {
            return Err(format!("{TAP} did not appear in {ns} within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for args in [
        ["-n", ns, "addr", "add", "10.77.0.1/24", "dev", TAP].as_slice(),
        ["-n", ns, "link", "set", TAP, "up"].as_slice(),
    ] {
        if !ip(args) {
            return Err(format!("ip {}", args.join(" ")));
        }
    }
    Ok(())
}

#[test]
fn probe_udp_echo_through_a_tap_in_a_namespace() {
    if !kvm_available() || !netns_available() {
        return;
    }
    udp_echo("net1", "");
}

/// Two queue pairs: a multi-queue TAP, one fd per pair. The probe's driver does not negotiate
/// VIRTIO_NET_F_MQ, so it runs on pair 0 alone, and pair 1's TAP queue must be detached for
/// every frame (the ARP reply, the echo) to reach pair 0.
#[test]
fn probe_udp_echo_with_two_queue_pairs() {
    if !kvm_available() || !netns_available() {
        return;
    }
    udp_echo("net2", ",num_queues=4");
}

fn udp_echo(tag: &str, extra: &str) {
    let mut ns = Netns::new(tag);
    ns.start_udp_echo();
    let spec = format!("tap={TAP},mac={MAC}{extra}");
    let child = ns
        .exec(hyperpool().to_str().unwrap())
        .args([
            "run",
            "--serial",
            "tty",
            "--cmdline",
            "probe=net",
            "--net",
            &spec,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hyperpool in the namespace");
    let configured = configure_tap(&ns, Duration::from_secs(10));
    let out = wait_with_limit(child, PROBE_LIMIT);
    if let Err(e) = configured {
        panic!("{e}\n{}", out.describe());
    }
    assert_eq!(out.code(), 0, "{}", out.describe());
    let figures = out.probe_ok("net");
    assert_eq!(figures, format!("mac={MAC} echo=15"), "{}", out.describe());
    assert!(out.stdout.contains("PROBE done"), "{}", out.describe());
}

#[test]
fn bad_net_options_are_one_line_and_exit_2() {
    for (spec, why) in [
        ("tap=hptap0,mac=52:54:00:zz:34:56", "not a MAC address"),
        ("tap=hptap0,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=a-much-too-long-name", "1 to 15 bytes"),
        ("tap=hptap0,num_queues=3", "not an even number from 2 to 32"),
        ("mac=52:54:00:12:34:56", "tap=NAME is required"),
    ] {
        let out = run(&["run", "--serial", "off", "--net", spec], PROBE_LIMIT);
        assert_eq!(out.code(), 2, "{spec}: {}", out.describe());
        let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "{spec}: {}", out.describe());
        assert!(lines[0].contains(why), "{spec}: {}", out.describe());
    }
}

#[test]
fn tap_that_cannot_be_opened_stops_before_the_guest() {
    if !kvm_available() {
        return;
    }
    // `lo` exists and is not a TAP: TUNSETIFF refuses it (EINVAL as root, EPERM otherwise).
    let out = run(&["run", "--serial", "tty", "--net", "tap=lo"], PROBE_LIMIT);
    assert_eq!(out.code(), 2, "{}", out.describe());
    assert!(
        out.stderr.contains("--net tap=lo: cannot open the TAP"),
        "{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains("hyperpool-probe"),
        "{}",
        out.describe()
    );
}

#[test]
fn one_tap_for_two_devices_is_refused() {
    if !kvm_available() {
        return;
    }
    let out = run(
        &[
            "run",
            "--serial",
            "tty",
            "--net",
            "tap=hpdup0",
            "--net",
            "tap=hpdup0",
        ],
        PROBE_LIMIT,
    );
    assert_eq!(out.code(), 2, "{}", out.describe());
    assert!(
        out.stderr
            .contains("TAP 'hpdup0' is used by more than one --net"),
        "{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains("hyperpool-probe"),
        "{}",
        out.describe()
    );
}
