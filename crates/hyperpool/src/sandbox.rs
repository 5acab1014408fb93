//! The seccomp allow-list of a device backend process (`hyperpool device ...`). It is applied
//! after the device's files are open and the socket is bound, so what remains is what serving
//! the frontend takes: its messages and descriptors, mapping guest memory, eventfds and epoll,
//! the device's I/O (io_uring and fsync for disks, TAP reads and writes, Unix-socket connects
//! for vsock, getrandom for rng) and the threads the device runs. Anything else kills the
//! process: no new files, no exec, no new processes, no ptrace, no new listening sockets.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

const ALLOWED: &[libc::c_long] = &[
    // Memory: the allocator, guest memory mappings, thread stacks.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // Descriptors the frontend sends and the device uses.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // Waiting and waking.
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_sched_yield,
    // vsock's connection timeouts.
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_sched_getaffinity,
    // Disks.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // The frontend's socket; vsock's host connections (Unix sockets).
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // Entropy (virtio-rng, random MACs).
    libc::SYS_getrandom,
    // Threads (device workers) and their end.
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Signals: the SIGTERM/SIGINT waiter, and the abort of a panic.
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_sigaltstack,
    // Removing our socket on the way out.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The ioctls left: non-blocking sockets (std's `set_nonblocking`, vsock) and the TAP requests a
/// running virtio-net makes (offloads when the driver's features arrive, the vnet header size,
/// attaching and detaching multi-queue TAP queues, reading a queue's name).
const IOCTLS: &[u64] = &[
    libc::FIONBIO,
    libc::FIOCLEX,
    0x4004_54d0, // TUNSETOFFLOAD
    0x4004_54d8, // TUNSETVNETHDRSZ
    0x4004_54d9, // TUNSETQUEUE
    0x8004_54d2, // TUNGETIFF
];

fn ioctl_rules() -> Result<Vec<SeccompRule>, String> {
    IOCTLS
        .iter()
        .map(|&request| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .map_err(|e| format!("seccomp rule: {e}"))?;
            SeccompRule::new(vec![cond]).map_err(|e| format!("seccomp rule: {e}"))
        })
        .collect()
}

/// What a device needs beyond the common list.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// Connect to host Unix sockets (vsock's host side): `socket(AF_UNIX, ...)` and `connect`.
    /// Without it a device process cannot reach any socket, its VMM's API included.
    pub unix_connect: bool,
    /// Change file sizes (a disk: qcow2 growing, discard and write-zeroes on raw images).
    pub resize_files: bool,
}

/// `socket` only for the Unix domain.
fn unix_socket_rules() -> Result<Vec<SeccompRule>, String> {
    let cond = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .map_err(|e| format!("seccomp rule: {e}"))?;
    Ok(vec![
        SeccompRule::new(vec![cond]).map_err(|e| format!("seccomp rule: {e}"))?,
    ])
}

/// `clone` only for threads (CLONE_THREAD): no new processes.
fn clone_rules() -> Result<Vec<SeccompRule>, String> {
    let thread = libc::CLONE_THREAD as u64;
    let cond = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )
    .map_err(|e| format!("seccomp rule: {e}"))?;
    Ok(vec![
        SeccompRule::new(vec![cond]).map_err(|e| format!("seccomp rule: {e}"))?,
    ])
}

fn compile(filter: Result<SeccompFilter, seccompiler::BackendError>) -> Result<BpfProgram, String> {
    filter
        .and_then(TryInto::try_into)
        .map_err(|e| format!("seccomp filter: {e}"))
}

/// Sets `no_new_privs` and installs the allow-list (with what `needs` adds) on every thread of
/// the process.
pub fn apply(needs: Needs) -> Result<(), String> {
    // A static binary has no libc `getrandom` to look up, so the getrandom crate reads
    // /dev/urandom; opening it here keeps it open for later, when `openat` is gone.
    getrandom::fill(&mut [0u8; 1]).map_err(|e| format!("entropy source: {e}"))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(libc::SYS_ioctl, ioctl_rules()?);
    rules.insert(libc::SYS_clone, clone_rules()?);
    if needs.unix_connect {
        rules.insert(libc::SYS_socket, unix_socket_rules()?);
        rules.insert(libc::SYS_connect, Vec::new());
    }
    if needs.resize_files {
        rules.insert(libc::SYS_fallocate, Vec::new());
        rules.insert(libc::SYS_ftruncate, Vec::new());
    }
    let allow_list = compile(SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    ))?;
    // clone3 takes its flags in memory, which a filter cannot read: it fails with ENOSYS (this
    // filter's verdict outranks the allow-list's), and glibc falls back to clone.
    let no_clone3 = compile(SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    ))?;
    // In this order: the allow-list has no `seccomp` in it.
    seccompiler::apply_filter_all_threads(&no_clone3).map_err(|e| format!("seccomp: {e}"))?;
    seccompiler::apply_filter_all_threads(&allow_list).map_err(|e| format!("seccomp: {e}"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    const CHILD: &str = "HYPERPOOL_SANDBOX_CHILD";

    /// Runs `child_runs_in_the_sandbox` in a process of its own doing `what` once sandboxed.
    fn sandboxed(what: &str) -> std::process::ExitStatus {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sandbox::tests::child_runs_in_the_sandbox",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(CHILD, what)
            .status()
            .unwrap()
    }

    /// Not a test on its own: the body of the processes `sandboxed` starts.
    #[test]
    fn child_runs_in_the_sandbox() {
        let Ok(what) = std::env::var(CHILD) else {
            return;
        };
        let vsock = super::Needs {
            unix_connect: true,
            ..Default::default()
        };
        let needs = if what.starts_with("vsock-") {
            vsock
        } else {
            super::Needs::default()
        };
        super::apply(needs).unwrap();
        let unix_socket = || {
            // SAFETY: socket(2) with constant arguments; the fd is left to the exit.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) }
        };
        match what.as_str() {
            "thread" => std::thread::spawn(|| ()).join().unwrap(),
            "socket" | "vsock-unix" => assert!(unix_socket() >= 0),
            // SAFETY: socket(2) with constant arguments.
            "vsock-inet" => drop(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }),
            "open" => drop(std::fs::File::open("/etc/hostname")),
            // SAFETY: the child exits at once; nothing else runs in it.
            "fork" => unsafe {
                if libc::fork() == 0 {
                    libc::_exit(0);
                }
            },
            _ => unreachable!(),
        }
        // SAFETY: ends this process with status 7 without unwinding into the harness.
        unsafe { libc::_exit(7) };
    }

    #[test]
    fn threads_run_but_opening_files_and_forking_kill_the_process() {
        assert_eq!(sandboxed("thread").code(), Some(7), "threads are allowed");
        assert_eq!(
            sandboxed("vsock-unix").code(),
            Some(7),
            "vsock reaches Unix sockets"
        );
        // No sockets at all for the other devices (their VMM's API is a Unix socket), and only
        // Unix ones for vsock.
        for what in ["open", "fork", "socket", "vsock-inet"] {
            let status = sandboxed(what);
            assert_eq!(status.signal(), Some(libc::SIGSYS), "{what}: {status:?}");
        }
    }
}
