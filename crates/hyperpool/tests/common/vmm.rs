//! A `hyperpool vmm --api-socket` process driven through its API, for the tests of the per-VM
//! API (`vmm_api.rs`, `vmm_hotplug.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyperpool_api::client::{Client, Response};
use serde_json::{Value, json};

pub struct Vmm {
    pub child: Child,
    pub api: Client,
    pub socket: PathBuf,
}

impl Vmm {
    pub fn start(dir: &Path) -> Self {
        let socket = dir.join("api.sock");
        let child = Command::new(super::hyperpool())
            .args(["vmm", "--api-socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let api = Client::new(&socket).with_timeout(Duration::from_secs(20));
        let deadline = Instant::now() + Duration::from_secs(10);
        while api.get("/api/v1/vmm.ping").is_err() {
            assert!(Instant::now() < deadline, "the API never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, api, socket }
    }

    pub fn put(&self, endpoint: &str, body: Option<Value>) -> Response {
        self.api
            .put(&format!("/api/v1/{endpoint}"), body.as_ref())
            .unwrap()
    }

    pub fn ok(&self, endpoint: &str, body: Option<Value>) {
        let r = self.put(endpoint, body);
        assert_eq!(r.status, 204, "{endpoint}: {}", r.text());
    }

    pub fn state(&self) -> String {
        let r = self.api.get("/api/v1/vm.info").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json::<Value>().unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the VMM did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the console log has `count` lines `line`.
pub fn wait_log(log: &Path, line: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().filter(|l| l.trim_end() == line).count() >= count {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {count}x '{line}' in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn probe_config(dir: &Path, cmdline: &str) -> Value {
    json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 64 << 20},
        "payload": {"cmdline": cmdline},
        "serial": {"mode": "Socket", "socket": dir.join("console.sock"),
                   "file": dir.join("console.log")},
    })
}
