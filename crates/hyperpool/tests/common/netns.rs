//! Network namespaces for the tests that put a TAP between the guest and a host-side program,
//! so no traffic touches the host's own interfaces.

use std::process::{Child, Command, Stdio};

/// True when namespace tests can run; without root, `ip` or python3 they skip, except under
/// CI=true, where that is a failure.
pub fn netns_available() -> bool {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let works = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ip = works("ip", "-V");
    let python = works("python3", "-V");
    if root && ip && python {
        return true;
    }
    let why = format!("needs root, `ip` and python3 (root={root} ip={ip} python3={python})");
    assert!(!ci, "{why} on a CI machine");
    eprintln!("skipping: {why}");
    false
}

/// Runs `ip ARGS` quietly; true if it succeeded.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace, removed on drop (also when the test fails), with the processes kept
/// in it killed first.
pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    /// `hp-<tag>-<pid>`, replacing a stale one of that name.
    pub fn new(tag: &str) -> Self {
        let name = format!("hp-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
        Self {
            name,
            children: Vec::new(),
        }
    }

    /// `program` run inside the namespace.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Kills and reaps `child` when the namespace goes.
    /// A UDP echo server on 10.77.0.1:7 in this namespace (IP_FREEBIND: the address may come
    /// with the TAP later), kept until the namespace goes.
    pub fn start_udp_echo(&mut self) {
        let script = "import socket\n\
                      s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                      s.setsockopt(socket.SOL_IP, 15, 1)\n\
                      s.bind(('10.77.0.1', 7))\n\
                      s.settimeout(120)\n\
                      while True:\n\
                      \x20   d, a = s.recvfrom(65536)\n\
                      \x20   s.sendto(d, a)\n";
        let child = self
            .exec("python3")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the UDP echo server");
        self.keep(child);
    }

    pub fn keep(&mut self, child: Child) {
        self.children.push(child);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}
