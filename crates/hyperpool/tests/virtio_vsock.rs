//! virtio-vsock end to end: the probe guest (virtio-drivers' vsock driver) talks to host Unix
//! sockets through the VMM in Firecracker's hybrid-vsock convention.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hp-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Unix-socket echo server at `path`, one thread per client.
fn echo_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn run_probe(socket: &Path, cid: u32) -> Finished {
    let spec = format!("cid={cid},socket={}", socket.display());
    run(
        &[
            "run",
            "--serial",
            "tty",
            "--cmdline",
            "probe=vsock",
            "--vsock",
            &spec,
        ],
        PROBE_LIMIT,
    )
}

#[test]
fn guest_connects_to_host_echo_listener() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("echo");
    let socket = dir.0.join("v.sock");
    echo_server(Path::new(&format!("{}_1234", socket.display())));
    let f = run_probe(&socket, 3);
    assert_eq!(f.probe_ok("vsock"), "cid=3 echo=15", "{}", f.describe());
    assert_eq!(f.code(), 0, "{}", f.describe());
}

/// The host side of a host-initiated stream: `CONNECT 5000`, `OK <port>`, then an echo.
fn host_connects(socket: &Path) -> Result<u32, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err("the VMM never created its socket".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    writer.write_all(b"CONNECT 5000\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let port: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .ok_or_else(|| format!("expected OK <port>, got {line:?}"))?;
    writer.write_all(b"hello-from-host").unwrap();
    let mut back = [0u8; 15];
    reader.read_exact(&mut back).map_err(|e| e.to_string())?;
    if &back != b"hello-from-host" {
        return Err(format!("echo was {:?}", String::from_utf8_lossy(&back)));
    }
    Ok(port)
}

#[test]
fn host_connects_to_listening_guest() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("listen");
    let socket = dir.0.join("v.sock");
    let spec = format!("cid=4,socket={}", socket.display());
    let child = command(&[
        "run",
        "--serial",
        "tty",
        "--cmdline",
        "probe=vsock-listen",
        "--vsock",
        &spec,
    ])
    .spawn()
    .expect("spawn hyperpool");
    let host = {
        let socket = socket.clone();
        std::thread::spawn(move || host_connects(&socket))
    };
    let f = wait_with_limit(child, PROBE_LIMIT);
    let port = host
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", f.describe()));
    assert_eq!(
        f.probe_ok("vsock-listen"),
        format!("port=5000 host_port={port} echoed=15"),
        "{}",
        f.describe()
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
}

#[test]
fn guest_gets_rst_when_nobody_listens() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("rst");
    let socket = dir.0.join("v.sock");
    let f = run_probe(&socket, 7);
    let line = f.probe_line("vsock").unwrap_or_default().to_string();
    assert!(
        line.starts_with("PROBE vsock FAIL")
            && line.contains("cid=7 connect: disconnected (Reset)"),
        "{}",
        f.describe()
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
}

#[test]
fn bad_vsock_options_exit_2_with_one_line() {
    let dir = TempDir::new("bad");
    let socket = dir.0.join("v.sock");
    let live = UnixListener::bind(&socket).unwrap();
    for (spec, needle) in [
        (format!("cid=2,socket={}", socket.display()), "at least 3"),
        ("cid=3".to_string(), "cid=N,socket=PATH"),
        (
            format!("cid=3,socket={}", socket.display()),
            "in use by another process",
        ),
    ] {
        let out = command(&["run", "--vsock", &spec])
            .env("HYPERPOOL_LOG", "off")
            .output()
            .unwrap();
        let f = Finished::from(out);
        assert_eq!(f.code(), 2, "{spec}: {}", f.describe());
        let lines: Vec<&str> = f.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{spec}: {}", f.describe());
        assert!(lines[0].contains(needle), "{spec}: {}", f.describe());
    }
    drop(live);
}
