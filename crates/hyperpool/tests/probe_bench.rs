//! The probe's I/O benchmarks (`bench-blk`, `bench-net`, run for real by `benches/io.py`) as
//! functional tests with short phases: they print positive figures, the data the guest wrote
//! is in the image, and frames arrive complete and in order both ways. Nothing here is timed.

mod common;

use common::netns::*;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const IMAGE_MIB: u64 = 64;
/// What `bench-blk` writes in the first word of the 4 KiB block at disk offset `o`: `o ^ MAGIC`;
/// word `j` (1..512) is `FILL ^ j` (guest/probe/src/bench_blk.rs).
const MAGIC: u64 = 0x4850_4245_4e43_4821;
const FILL: u64 = 0x9e37_79b9_7f4a_7c15;
const TAP: &str = "hpbench0";
const MAC: &str = "52:54:00:12:34:57";
const RX_SMALL: u64 = 3000;
const RX_LARGE: u64 = 1000;

/// `key=number` pairs of a probe line's figures.
fn figures(text: &str) -> Vec<(&str, f64)> {
    text.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap_or(f64::NAN)))
        .collect()
}

fn assert_positive(text: &str, keys: &[&str], context: &str) {
    let got = figures(text);
    for key in keys {
        let value = got.iter().find(|(k, _)| k == key).map(|&(_, v)| v);
        assert!(
            value.is_some_and(|v| v > 0.0),
            "{key} missing or not positive in '{text}'\n{context}"
        );
    }
}

/// The number after `key=` in the stdout lines that start with `prefix`.
fn detail(f: &Finished, prefix: &str, key: &str) -> u64 {
    f.stdout
        .lines()
        .filter(|l| l.starts_with(prefix))
        .flat_map(str::split_whitespace)
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in a '{prefix}' line\n{}", f.describe()))
}

#[test]
fn bench_blk_prints_figures_and_leaves_its_pattern_in_the_image() {
    if !kvm_available() {
        return;
    }
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(IMAGE_MIB << 20).unwrap();
    let cmdline = format!("probe=bench-blk bench.ms=200 bench.blk.mib={IMAGE_MIB}");
    let disk = format!("path={}", img.path().display());
    let f = run(
        &[
            "run",
            "--memory",
            "256M",
            "--serial",
            "tty",
            "--cmdline",
            &cmdline,
            "--disk",
            &disk,
        ],
        PROBE_LIMIT,
    );
    let line = f.probe_ok("bench-blk");
    assert_positive(
        line,
        &["randread4k_qd32_iops", "seqread1m_mbps", "seqwrite1m_mbps"],
        &f.describe(),
    );
    assert_eq!(f.code(), 0, "{}", f.describe());

    // Whatever the write phase covered holds the pattern, block by block; the rest is untouched.
    let covered = detail(&f, "bench-blk: ", "covered_mib") << 20;
    assert!(
        (8 << 20..=IMAGE_MIB << 20).contains(&covered),
        "{}",
        f.describe()
    );
    let data = std::fs::read(img.path()).unwrap();
    for (at, word) in data.chunks_exact(8).enumerate() {
        let offset = at as u64 * 8;
        let word = u64::from_le_bytes(word.try_into().unwrap());
        let j = (offset % 4096) / 8;
        let want = match offset {
            o if o >= covered => 0,
            o if j == 0 => o ^ MAGIC,
            _ => FILL ^ j,
        };
        assert_eq!(word, want, "image word at {offset:#x}");
    }
}

/// Writes `count` frames of `size` bytes for `mac` into the TAP (bench-net's rx format).
const SENDER: &str = r#"
import socket, struct, sys
size, count, mac, ifname = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
frame = bytearray(bytes.fromhex(mac.replace(":", "")) + bytes.fromhex("020000000002")
                  + b"\x88\xb5" + b"HPBENCH!" + bytes(size - 22))
for i in range(count):
    struct.pack_into(">I", frame, 22, i)
    s.send(frame)
"#;

fn in_ns(ns: &Netns, args: &[&str]) -> Result<String, String> {
    let out = ns
        .exec(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into())
}

/// A TAP kept by the namespace (it outlives the VMM, so its counters can be read after),
/// up, with room for every queued RX frame, and without IPv6 chatter toward the guest.
fn make_tap(ns: &Netns) {
    let name = ns.name.as_str();
    in_ns(
        ns,
        &[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ],
    )
    .unwrap();
    assert!(ip(&[
        "-n", name, "tuntap", "add", "dev", TAP, "mode", "tap"
    ]));
    assert!(ip(&[
        "-n",
        name,
        "link",
        "set",
        TAP,
        "txqueuelen",
        "10000",
        "up"
    ]));
}

#[test]
fn bench_net_frames_arrive_complete_and_in_order_both_ways() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = Netns::new("bench");
    make_tap(&ns);
    let cmdline = format!(
        "probe=bench-net bench.ms=200 bench.net.rx_small={RX_SMALL} bench.net.rx_large={RX_LARGE}"
    );
    let spec = format!("tap={TAP},mac={MAC}");
    let mut child = ns
        .exec(hyperpool().to_str().unwrap())
        .args([
            "run",
            "--memory",
            "256M",
            "--serial",
            "tty",
            "--cmdline",
            &cmdline,
        ])
        .args(["--net", &spec])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hyperpool in the namespace");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // The host side of the rx phases: queue the frames the guest asks for, then say go.
    let deadline = Instant::now() + PROBE_LIMIT;
    let mut lines = Vec::new();
    let mut sender_error = None;
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if let Some(rest) = line.strip_prefix("bench-net: rx-ready ") {
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                    .unwrap_or_default()
                    .to_string()
            };
            let (size, count, mac) = (field("frame"), field("frames"), field("mac"));
            match in_ns(&ns, &["python3", "-c", SENDER, &size, &count, &mac, TAP]) {
                Ok(_) => {
                    let _ = stdin.write_all(b"g");
                    let _ = stdin.flush();
                }
                Err(e) => sender_error = Some(e),
            }
        }
        lines.push(line);
    }
    drop(stdin);
    // Stdout has closed (or the limit passed): the VMM is exiting or hung.
    let limit = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > limit {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let f = Finished {
        status,
        stdout: lines.join("\n"),
        stderr: stderr.join().unwrap_or_default(),
    };
    if let Some(e) = sender_error {
        panic!("frame sender: {e}\n{}", f.describe());
    }
    let line = f.probe_ok("bench-net");
    assert_positive(
        line,
        &["tx_pps", "tx_gbps", "rx_pps", "rx_gbps"],
        &f.describe(),
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
    // The guest itself fails the check unless every rx frame came, in order; the TAP saw at
    // least every tx frame the device reported as sent.
    let sent: u64 = f
        .stdout
        .lines()
        .filter(|l| l.starts_with("bench-net: tx "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("frames="))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum();
    assert!(sent > 0, "{}", f.describe());
    let counted: u64 = in_ns(
        &ns,
        &[
            "cat",
            &format!("/sys/class/net/{TAP}/statistics/rx_packets"),
        ],
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    assert!(
        counted >= sent,
        "TAP counted {counted} frames, guest sent {sent}\n{}",
        f.describe()
    );
}
