//! The pool daemon on real KVM: many probe-guest VMs through the CLI, console attach, a daemon
//! killed and restarted, VMMs killed, and nothing left behind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    state: PathBuf,
    extra: Vec<String>,
}

impl Daemon {
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut d = Self {
            child: None,
            socket: dir.join("pool.sock"),
            state: dir.join("state"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.socket.with_extension("log"))
            .unwrap();
        let child = Command::new(common::hyperpool())
            .arg("serve")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.cli(&["pool"]).status.success() {
            assert!(Instant::now() < deadline, "the daemon never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(common::hyperpool())
            .args(args)
            .env("HYPERPOOL_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a client command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "hyperpool {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn record(&self, name: &str) -> Value {
        self.json(&["inspect", name])
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.socket.with_extension("log")).unwrap_or_default()
    }

    /// `hyperpool console NAME`: sends `ping`, expects `pong`, detaches with Ctrl-].
    fn ping(&self, name: &str) {
        let mut console = Command::new(common::hyperpool())
            .args(["console", name])
            .env("HYPERPOOL_SOCKET", &self.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdin = console.stdin.take().unwrap();
        let stdout = console.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        'outer: loop {
            stdin.write_all(b"ping\n").unwrap();
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
                if line.trim_end() == "pong" {
                    break 'outer;
                }
                seen.push(line);
            }
            assert!(Instant::now() < deadline, "{name}: no pong; saw {seen:?}");
        }
        stdin.write_all(&[0x1d]).unwrap();
        let status = console.wait().unwrap();
        assert!(status.success(), "console exit {status}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Leave no VMM behind, even when a test fails half-way.
        if let Ok(vms) = std::fs::read_dir(self.state.join("vms")) {
            for vm in vms.flatten() {
                let _ = self.cli(&["kill", &vm.file_name().to_string_lossy()]);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn vmm_processes(state: &Path) -> Vec<u32> {
    let needle = state.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("\0vmm\0") && c.contains(&needle)
            })
        })
        .collect()
}

fn pid(record: &Value) -> u32 {
    record["pid"].as_u64().unwrap() as u32
}

fn kill9(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn twenty_vms_answer_on_their_consoles_and_leave_nothing_behind() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 20 one-vCPU VMs on a 2-core host: more than the default 4 vCPUs per core.
    let daemon = Daemon::start(dir.path(), &["--cpu-overcommit", "10"]);
    let names: Vec<String> = (0..20).map(|i| format!("vm{i:02}")).collect();
    let root = is_root();
    // One VM has a NIC when we may create TAPs: its TAP must go away with it.
    let tap = format!("hpdt{}", std::process::id() % 10000);
    for (i, name) in names.iter().enumerate() {
        let mut args = vec![
            "create",
            name,
            "--memory",
            "32M",
            "--cmdline",
            "probe=idle",
            "--start",
        ];
        let net = format!("tap={tap}");
        if i == 0 && root {
            args.extend(["--net", &net]);
        }
        daemon.ok(&args);
    }
    let listed = daemon.json(&["ls"]);
    let running = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["status"] == "running")
        .count();
    assert_eq!(running, 20, "{listed}");
    assert_eq!(vmm_processes(&daemon.state).len(), 20);
    for name in &names {
        daemon.ping(name);
    }
    let table = daemon.ok(&["ls"]);
    assert_eq!(
        table.lines().filter(|l| l.contains(" running ")).count(),
        20,
        "{table}"
    );
    let pool = daemon.json(&["pool"]);
    assert_eq!(pool["allocated_vcpus"], 20);
    assert_eq!(pool["allocated_memory_mib"], 20 * 32);
    let details = daemon.record("vm03");
    let live = &details["live"];
    assert!(
        live["resident_guest_bytes"].as_u64().unwrap() > 0,
        "{details}"
    );
    assert!(live["vmm_rss_bytes"].as_u64().unwrap() > 0, "{details}");
    let logs = daemon.ok(&["logs", "vm03"]);
    assert!(logs.contains("PROBE idle ready\npong\n"), "{logs}");

    // Stop (the probe powers off at the power button) and remove every VM.
    for name in &names {
        let out = daemon.ok(&["stop", name]);
        assert!(out.contains("stopped"), "{out}");
        daemon.ok(&["rm", name]);
    }
    assert_eq!(daemon.json(&["ls"]), Value::Array(vec![]));
    assert!(vmm_processes(&daemon.state).is_empty());
    let left: Vec<_> = std::fs::read_dir(daemon.state.join("vms"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
    for name in &names {
        for controller in ["memory", "cpu", "unified"] {
            let cg = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join("hyperpool")
                .join(name);
            assert!(!cg.exists(), "{} left", cg.display());
        }
    }
    if root {
        let tap = format!("/sys/class/net/{tap}");
        assert!(!Path::new(&tap).exists(), "{tap} left");
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

#[test]
fn a_restarted_daemon_takes_its_running_vms_back() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &[]);
    for name in ["a", "b", "c"] {
        daemon.ok(&[
            "create",
            name,
            "--memory",
            "32M",
            "--cmdline",
            "probe=idle",
            "--start",
        ]);
    }
    let before: Vec<u32> = ["a", "b", "c"]
        .iter()
        .map(|n| pid(&daemon.record(n)))
        .collect();
    daemon.kill9();
    assert_eq!(
        vmm_processes(&daemon.state).len(),
        3,
        "VMs outlive the daemon"
    );
    daemon.spawn();
    for (name, pid_before) in ["a", "b", "c"].iter().zip(&before) {
        let r = daemon.record(name);
        assert_eq!(r["status"], "running", "{r}");
        assert_eq!(pid(&r), *pid_before, "{r}");
        daemon.ping(name);
    }
    daemon.ok(&["pause", "b"]);
    assert_eq!(daemon.record("b")["status"], "paused");
    daemon.ok(&["resume", "b"]);
    daemon.ping("b");
    // An adopted VMM that dies is noticed too.
    kill9(before[2]);
    wait_for("c crashed", || daemon.record("c")["status"] == "crashed");
    for name in ["a", "b"] {
        daemon.ok(&["stop", name]);
    }
    for name in ["a", "b", "c"] {
        daemon.ok(&["rm", name]);
    }
    assert!(vmm_processes(&daemon.state).is_empty());
}

#[test]
fn killed_vmms_are_crashes_and_policies_restart_them() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--stop-timeout", "2"]);
    daemon.ok(&[
        "create",
        "never",
        "--memory",
        "32M",
        "--cmdline",
        "probe=idle",
        "--start",
    ]);
    daemon.ok(&[
        "create",
        "again",
        "--memory",
        "32M",
        "--cmdline",
        "probe=idle",
        "--start",
        "--restart",
        "on-failure",
    ]);
    // A guest that ignores the power button: stopped by force after the timeout.
    daemon.ok(&[
        "create",
        "deaf",
        "--memory",
        "32M",
        "--cmdline",
        "probe=cmdline probe.end=halt",
        "--start",
    ]);
    let untouched = pid(&daemon.record("deaf"));

    kill9(pid(&daemon.record("never")));
    wait_for("never crashed", || {
        daemon.record("never")["status"] == "crashed"
    });
    let r = daemon.record("never");
    assert!(r["last_exit"].as_str().unwrap().contains("signal 9"), "{r}");

    let first = pid(&daemon.record("again"));
    kill9(first);
    wait_for("again restarted", || {
        let r = daemon.record("again");
        r["restarts"] == 1 && r["status"] == "running"
    });
    assert_ne!(pid(&daemon.record("again")), first);
    daemon.ping("again");
    assert_eq!(
        pid(&daemon.record("deaf")),
        untouched,
        "the others are untouched"
    );

    let t = Instant::now();
    let out = daemon.ok(&["stop", "deaf"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "forced only after the timeout"
    );
    // A stopped VM can start again; its clean power-off is not a crash.
    daemon.ok(&["start", "never"]);
    daemon.ping("never");
    for name in ["never", "again"] {
        daemon.ok(&["stop", name]);
        assert_eq!(daemon.record(name)["status"], "stopped");
    }
    for name in ["never", "again", "deaf"] {
        daemon.ok(&["rm", name]);
    }
}

#[test]
fn mistakes_get_one_line_and_exit_2() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123").unwrap();
    let port = 20000 + std::process::id() % 20000;
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(
        dir.path(),
        &["--listen", &listen, "--token-file", token.to_str().unwrap()],
    );
    let spec = dir.path().join("vm.toml");
    std::fs::write(
        &spec,
        "name = \"fromfile\"\ncpus = 1\nmemory_mib = 32\ncmdline = \"probe=idle\"\n",
    )
    .unwrap();
    daemon.ok(&["create", "--spec", spec.to_str().unwrap()]);
    assert_eq!(daemon.record("fromfile")["status"], "stopped");

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "fromfile"], "exists already"),
        (vec!["create", "Bad Name"], "name 'Bad Name'"),
        (
            vec![
                "create", "big", "--cpus", "64", "--memory", "32M", "--start",
            ],
            "not enough CPU",
        ),
        (vec!["start", "nosuch"], "no VM named 'nosuch'"),
        (
            vec!["create", "d", "--disk", "path=/nonexistent.raw"],
            "is not a file",
        ),
        (vec!["stop", "fromfile"], "is not running"),
    ];
    for (args, needle) in cases {
        let out = daemon.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    // The refused 'big' was defined but not started; nothing runs.
    assert!(vmm_processes(&daemon.state).is_empty());

    let no_daemon = Command::new(common::hyperpool())
        .args(["ls", "--socket", "/nonexistent/pool.sock"])
        .output()
        .unwrap();
    assert_eq!(no_daemon.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_daemon.stderr).contains("hyperpool serve"));

    // TCP needs the bearer token.
    let url = format!("http://{listen}/v1/pool");
    let curl = |extra: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&[]), "401");
    assert_eq!(
        curl(&["-H", "Authorization: Bearer wrong-token-000000"]),
        "401"
    );
    assert_eq!(
        curl(&["-H", "Authorization: Bearer 0123456789abcdef0123"]),
        "200"
    );

    // Metrics speak Prometheus text.
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&daemon.socket)
        .arg("http://localhost/metrics")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hyperpool_vms{status=\"stopped\"} 2"),
        "{text}"
    );
    for name in ["fromfile", "big"] {
        daemon.ok(&["rm", name]);
    }
}

/// `curl --unix-socket`: (status, body).
fn curl(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "-X", method, "--unix-socket"])
        .arg(socket);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = cmd.arg(format!("http://localhost{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// The repo's OpenAPI document as JSON, for validating responses against its schemas.
fn openapi() -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/pool-api.yaml"),
    )
    .unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// Checks `instance` against `#/components/schemas/<schema>` of the document.
fn assert_matches_schema(doc: &Value, schema: &str, instance: &Value) {
    let root = serde_json::json!({
        "components": doc["components"],
        "$ref": format!("#/components/schemas/{schema}"),
    });
    let validator = jsonschema::validator_for(&root).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{schema}: {errors:?}\n{instance}");
}

#[test]
fn bad_specs_are_refused_naming_the_field_and_responses_match_the_document() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &["--memory-overcommit", "1.0"]);
    let s = &daemon.socket;
    let cases = [
        (r#"{"name": "a", "bogus": 1}"#, "bogus"),
        (r#"{"name": "a", "memory_mib": -1}"#, "memory_mib"),
        (r#"{"name": "a", "memory_mib": 0}"#, "memory"),
        (r#"{"name": "a", "cpus": 0}"#, "cpus"),
        (
            r#"{"name": "a", "kernel": "/nonexistent/vmlinux"}"#,
            "kernel",
        ),
        (r#"{"name": "../etc"}"#, "name"),
        (r#"{"name": "a/b"}"#, "name"),
        (
            r#"{"name": "a", "disks": [{"path": "/x", "size": 1}]}"#,
            "disks[0].size",
        ),
    ];
    for (body, field) in cases {
        let (code, text) = curl(s, "POST", "/v1/vms", Some(body));
        assert_eq!(code, 400, "{body}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap();
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: {msg}");
    }
    // Nothing half-created: no records, no VM directories.
    assert_eq!(daemon.json(&["ls"]), Value::Array(vec![]));
    assert_eq!(
        std::fs::read_dir(daemon.state.join("vms")).unwrap().count(),
        0
    );

    // Memory overcommit 1.0: a VM larger than the host's memory is defined but not started.
    let (code, text) = curl(
        s,
        "POST",
        "/v1/vms?start=true",
        Some(r#"{"name": "huge", "memory_mib": 4194304, "cmdline": "probe=idle"}"#),
    );
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("not enough memory in the pool"), "{text}");
    assert!(vmm_processes(&daemon.state).is_empty());

    // Responses have the documented shapes.
    let doc = openapi();
    let (code, text) = curl(
        s,
        "POST",
        "/v1/vms?start=true",
        Some(r#"{"name": "ok", "memory_mib": 32, "cmdline": "probe=idle"}"#),
    );
    assert_eq!(code, 201, "{text}");
    assert_matches_schema(&doc, "VmRecord", &serde_json::from_str(&text).unwrap());
    for (path, schema) in [
        ("/v1/vms/ok", "VmDetails"),
        ("/v1/vms/huge", "VmDetails"),
        ("/v1/pool", "PoolInfo"),
    ] {
        let (code, text) = curl(s, "GET", path, None);
        assert_eq!(code, 200, "{path}: {text}");
        assert_matches_schema(&doc, schema, &serde_json::from_str(&text).unwrap());
    }
    let (_, text) = curl(s, "GET", "/v1/vms", None);
    for record in serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
    {
        assert_matches_schema(&doc, "VmRecord", record);
    }
    let (code, text) = curl(s, "GET", "/v1/vms/nosuch", None);
    assert_eq!(code, 404);
    assert_matches_schema(&doc, "ApiError", &serde_json::from_str(&text).unwrap());
    let (code, text) = curl(s, "POST", "/v1/vms/ok/stop", None);
    assert_eq!(code, 200, "{text}");
    assert_matches_schema(&doc, "VmRecord", &serde_json::from_str(&text).unwrap());
    for name in ["ok", "huge"] {
        assert_eq!(curl(s, "DELETE", &format!("/v1/vms/{name}"), None).0, 204);
    }
}

#[test]
fn placement_pins_and_limits_the_vmm() {
    if !common::kvm_available() || !is_root() {
        return;
    }
    let cores = std::thread::available_parallelism().unwrap().get();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let last = cores - 1;
    let spec = dir.path().join("pinned.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"pinned\"\nmemory_mib = 32\ncmdline = \"probe=idle\"\n\
             [placement]\npin_cores = [{last}]\ncpu_weight = 50\ncpu_max = 0.5\n"
        ),
    )
    .unwrap();
    daemon.ok(&["create", "--spec", spec.to_str().unwrap(), "--start"]);
    let vmm = pid(&daemon.record("pinned"));
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    assert_eq!(
        allowed,
        last.to_string(),
        "the VMM runs only on core {last}"
    );
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    assert!(cgroups.contains("hyperpool/pinned"), "{cgroups}");
    daemon.ping("pinned");
    // A core the host does not have is refused before anything runs.
    std::fs::write(
        &spec,
        format!("name = \"far\"\n[placement]\npin_cores = [{cores}]\n"),
    )
    .unwrap();
    let out = daemon.cli(&["create", "--spec", spec.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("pin_cores"));
    daemon.ok(&["stop", "pinned"]);
    daemon.ok(&["rm", "pinned"]);
}

/// Starts run side by side (off the controller's thread) and are committed once each: many
/// concurrent create+start requests all run, one of two concurrent starts of the same VM is
/// refused, and every acknowledged start survives the daemon being killed right after.
#[test]
fn concurrent_starts_all_run_and_are_durable_when_acknowledged() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(dir.path(), &["--cpu-overcommit", "20"]);
    let api = hyperpool_api::client::Client::new(&daemon.socket);
    let names: Vec<String> = (0..12).map(|i| format!("c{i:02}")).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let api = api.clone();
                s.spawn(move || {
                    let body = serde_json::json!({
                        "name": name, "memory_mib": 32, "cmdline": "probe=idle"
                    })
                    .to_string()
                    .into_bytes();
                    api.request("POST", "/v1/vms?start=true", Some(body))
                        .unwrap()
                })
            })
            .collect();
        for h in handles {
            let r = h.join().unwrap();
            assert_eq!(r.status, 201, "{}", r.text());
            assert_eq!(r.json::<Value>().unwrap()["status"], "running");
        }
    });

    daemon.ok(&[
        "create",
        "twice",
        "--memory",
        "32M",
        "--cmdline",
        "probe=idle",
    ]);
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let api = api.clone();
                s.spawn(move || {
                    let r = api.request("POST", "/v1/vms/twice/start", None).unwrap();
                    (r.status, r.text())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let started = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(started, 1, "{statuses:?}");
    assert!(
        statuses.iter().any(|(s, t)| *s == 409
            && (t.contains("is starting") || t.contains("already running"))),
        "{statuses:?}"
    );

    // Acknowledged means on disk: a daemon killed now finds every VM running again.
    daemon.kill9();
    daemon.spawn();
    let mut all = names.clone();
    all.push("twice".into());
    for name in &all {
        let r = daemon.record(name);
        assert_eq!(r["status"], "running", "{r}");
    }
    assert_eq!(vmm_processes(&daemon.state).len(), all.len());
    daemon.ping("c07");
    for name in &all {
        daemon.ok(&["kill", name]);
        daemon.ok(&["rm", name]);
    }
    assert!(vmm_processes(&daemon.state).is_empty());
}

/// The `hyperpool device` processes serving a VMM's devices (its children).
fn device_processes_of(vmm: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(vmm)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("\0device\0blk\0"))
        })
        .collect()
}

/// `--device-processes`: the VM's disk is served by a sandboxed child of its VMM (the guest's
/// blk check writes through it to the image); killing the VMM takes the child along, and the
/// removed VM leaves neither processes nor files.
#[test]
fn a_vm_with_device_processes_serves_its_disk_from_a_child() {
    if !common::kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 16 << 20]).unwrap();
    let daemon = Daemon::start(dir.path(), &[]);
    let disk = format!("path={}", image.display());
    daemon.ok(&[
        "create",
        "dp",
        "--memory",
        "64M",
        "--cmdline",
        "probe=blk,idle",
        "--disk",
        &disk,
        "--device-processes",
        "--start",
    ]);
    wait_for("the blk check", || {
        daemon.ok(&["logs", "dp"]).contains("PROBE idle ready")
    });
    let logs = daemon.ok(&["logs", "dp"]);
    assert!(logs.contains("PROBE blk ok disks=1 "), "{logs}");
    let written = std::fs::read(&image).unwrap();
    assert_eq!(&written[512..528], b"HYPERPOOL-PROBE-", "{logs}");

    let vmm = pid(&daemon.record("dp"));
    let children = device_processes_of(vmm);
    assert_eq!(children.len(), 1, "device processes of {vmm}: {children:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", children[0])).unwrap();
    assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    assert!(status.contains("\nNoNewPrivs:\t1\n"), "{status}");
    // The VMM no longer has the image open: the child does.
    let holds_image = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == image))
    };
    assert!(!holds_image(vmm));
    assert!(holds_image(children[0]));

    // A killed VMM takes its device process along (its lifeline pipe reads end-of-file).
    kill9(vmm);
    wait_for("the device process to exit", || {
        !Path::new(&format!("/proc/{}", children[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", children[0]))
                .is_ok_and(|s| s.contains(") Z "))
    });
    wait_for("the VM to be marked crashed", || {
        daemon.record("dp")["status"] != "running"
    });
    daemon.ok(&["rm", "dp"]);
    let left: Vec<_> = std::fs::read_dir(daemon.state.join("vms"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "files left: {left:?}");
}
