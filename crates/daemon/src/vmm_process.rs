//! One VMM process per VM: started in its own process group (so signals aimed at the daemon do
//! not reach it and it outlives a daemon crash), configured through its Cloud Hypervisor API,
//! watched until it ends, and found again by pid after a daemon restart.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hyperpool_api::client::{Client, Request};
use serde_json::Value;

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Exit status 0: the guest powered off, or the VMM was shut down through its API.
    Clean,
    /// Non-zero status or a signal: the VMM or the guest failed.
    Failed(String),
}

pub fn api(socket: &Path) -> Client {
    Client::new(socket).with_timeout(Duration::from_secs(10))
}

/// Starts `hyperpool vmm` for a VM on an API socket bound here and handed down as the VMM's
/// stdin (`--api-fd 0`): the socket listens before the VMM runs, so requests can be sent at
/// once and wait in its backlog, with no polling for the API to come up. If the VMM dies, the
/// socket dies with it (this process keeps no copy), and a waiting request fails at once.
pub fn spawn(vmm_binary: &Path, socket: &Path, log: &Path) -> Result<Child, String> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("VMM log {}: {e}", log.display()))?;
    let err_file = log_file
        .try_clone()
        .map_err(|e| format!("VMM log {}: {e}", log.display()))?;
    let listener = bind(socket)?;
    use std::os::unix::process::CommandExt;
    // The Command (and with it our copy of the listener) is dropped at the end of this
    // statement; stdin is passed by the spawn's dup2, so no other child inherits the socket.
    Command::new(vmm_binary)
        .arg("vmm")
        .arg("--api-socket")
        .arg(socket)
        .args(["--api-fd", "0"])
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(log_file)
        .stderr(err_file)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", vmm_binary.display()))
}

/// The VMM's API socket, mode 0600 (the API is as powerful as the VMM), replacing a stale one.
fn bind(socket: &Path) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).map_err(|e| format!("API socket {}: {e}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("API socket {}: {e}", socket.display()))?;
    Ok(listener)
}

/// PUT an endpoint of a VM's API; an error is the VMM's own one-line answer.
pub fn put(socket: &Path, endpoint: &str, body: Option<&Value>) -> Result<(), String> {
    put_in_order(socket, &[(endpoint, body)])
}

/// PUT several endpoints in order on one connection (see [`Client::in_order`]); stops at the
/// first error, which is the VMM's own one-line answer.
pub fn put_in_order(socket: &Path, calls: &[(&str, Option<&Value>)]) -> Result<(), String> {
    let paths: Vec<String> = calls.iter().map(|(e, _)| format!("/api/v1/{e}")).collect();
    let requests = calls
        .iter()
        .zip(&paths)
        .map(|((_, body), path)| Request {
            method: "PUT",
            path,
            body: body.map(|b| b.to_string().into_bytes()),
        })
        .collect();
    let answers = api(socket).in_order(requests).map_err(|e| {
        let endpoint = e.path.strip_prefix("/api/v1/").unwrap_or(&e.path);
        format!("{endpoint}: {}", e.error)
    })?;
    match answers.last() {
        Some(last) if !last.is_success() => Err(last.text()),
        _ => Ok(()),
    }
}

pub fn get(socket: &Path, endpoint: &str) -> Result<Value, String> {
    let r = api(socket)
        .get(&format!("/api/v1/{endpoint}"))
        .map_err(|e| format!("{endpoint}: {e}"))?;
    if r.is_success() {
        r.json().map_err(|e| e.to_string())
    } else {
        Err(r.text())
    }
}

/// Whether `pid` is a live `hyperpool vmm` serving `socket` (not a reused pid).
pub fn is_our_vmm(pid: u32, socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let socket = socket.as_os_str().as_encoded_bytes();
    args.contains(&b"vmm".as_slice()) && args.contains(&socket) && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Waits for a VMM that is our child (reaping it) and describes how it ended.
pub fn wait_child(mut child: Child) -> Ended {
    match child.wait() {
        Ok(s) if s.success() => Ended::Clean,
        Ok(s) => Ended::Failed(describe(s)),
        Err(e) => Ended::Failed(format!("waiting for the VMM: {e}")),
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(4), _) => "the guest crashed (VMM exit status 4)".into(),
        (Some(c), _) => format!("the VMM exited with status {c}"),
        (_, Some(s)) => format!("the VMM was killed by signal {s}"),
        _ => format!("the VMM ended: {status}"),
    }
}

/// Watches a VMM that is not our child (found again after a daemon restart) until it is gone.
/// Its exit status is not ours to read, so an end we did not ask for counts as a failure.
pub fn wait_adopted(pid: u32, socket: PathBuf) -> Ended {
    while is_our_vmm(pid, &socket) {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ended::Failed("the VMM ended while the daemon was not its parent".into())
}

/// What the kernel knows about a VMM process: CPU time (ms) and resident memory (bytes).
pub fn process_figures(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3 of stat(5); utime and stime are 14 and 15.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&h| h > 0)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks * 1000 / hz, rss_kb * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_this_process() {
        let (cpu_ms, rss) = process_figures(std::process::id()).unwrap();
        assert!(rss > 1 << 20, "{rss}");
        let _ = cpu_ms;
        assert!(!is_our_vmm(std::process::id(), Path::new("/nope.sock")));
        assert!(!is_our_vmm(u32::MAX, Path::new("/nope.sock")));
    }

    #[test]
    fn exit_statuses_are_described() {
        use std::os::unix::process::ExitStatusExt;
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(describe(killed), "the VMM was killed by signal 9");
        let crashed = std::process::ExitStatus::from_raw(4 << 8);
        assert!(describe(crashed).contains("guest crashed"));
    }
}
