//! The host side of vsock on Unix sockets, in Firecracker's hybrid-vsock convention:
//!
//! - The VMM listens on `PATH`. A host program connects and writes `CONNECT <port>\n`; the
//!   muxer asks the guest (REQUEST to `<port>`) and, once the guest accepts, answers
//!   `OK <host port>\n` (the host-side port it chose) and the socket carries the stream.
//! - A guest connection to CID 2 port `P` is connected to the Unix listener at `PATH_P`; if
//!   nobody listens there the guest gets RST.
//!
//! - A host client has [`CONNECT_TIMEOUT`] to send its line, and the guest as long again to
//!   answer the REQUEST (Firecracker's 2 s): a guest that never does (nobody listens and it
//!   stays silent, or it is busy or broken) would otherwise hold the client, and a connection
//!   slot, forever. On expiry the client's socket is closed (it reads EOF, not `OK`) and the
//!   guest gets RST, so a late RESPONSE finds nothing.
//!
//! The muxer owns an epoll set of its sockets and its timer; the device thread waits on that
//! epoll's fd next to the queue eventfds and calls [`Muxer::process_host_events`] when it is
//! readable.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, State, Verdict};
use super::packet::{HOST_CID, Header, PacketError, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};

/// Connections at once; further guest REQUESTs get RST, further host clients are closed.
const MAX_CONNS: usize = 1024;
/// Host clients that have not finished their `CONNECT` line yet.
const MAX_PENDING: usize = 64;
/// `CONNECT 4294967295\n` is 19 bytes.
const MAX_LINE: usize = 32;
/// The device stops taking TX packets while this many control packets wait for RX buffers.
const CONTROL_SOFT_MAX: usize = 1024;
/// Control packets beyond this are dropped (only host events can push past the soft limit).
const CONTROL_HARD_MAX: usize = 2 * CONTROL_SOFT_MAX;
/// Host-side ports for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER: u64 = 0;
/// The timer's token (slot tokens count up from 1 and never get here).
const TIMER: u64 = u64::MAX;
/// How long a host client may take to send `CONNECT <port>\n`, and the guest to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A stream, named from the host's side.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    /// The host's port (the guest's `dst_port`).
    pub local: u32,
    /// The guest's port.
    pub peer: u32,
}

#[derive(Clone, Copy, Debug)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

enum Slot {
    Pending(PendingHost),
    Conn(Key),
}

/// A host client that has not sent its whole `CONNECT <port>\n` yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What a deadline is for.
#[derive(Clone, Copy, Debug)]
enum Waiting {
    /// The `CONNECT` line of the pending client in this slot.
    Line(u64),
    /// The guest's answer to the REQUEST for this host-initiated connection (and its slot
    /// token, so a later stream that reuses the key is not mistaken for it).
    Guest(Key, u64),
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    /// (device, inode) of the socket file we bound, so that we only remove our own.
    ident: (u64, u64),
    epoll: Epoll,
    slots: HashMap<u64, Slot>,
    next_token: u64,
    conns: HashMap<Key, (u64, Connection)>,
    control: VecDeque<Control>,
    next_local_port: u32,
    /// Deadlines in expiry order (all are [`Muxer::connect_timeout`] long), and the timer that
    /// fires at the first.
    deadlines: VecDeque<(Instant, Waiting)>,
    timer: TimerFd,
    connect_timeout: Duration,
}

/// Binds `path`: refused if another process listens there, a stale socket file is replaced,
/// anything else at `path` is refused.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "in use by another process",
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}

impl Muxer {
    pub fn bind(guest_cid: u64, path: &Path) -> io::Result<Self> {
        let listener = bind(path)?;
        listener.set_nonblocking(true)?;
        let meta = std::fs::symlink_metadata(path)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        Ok(Self {
            guest_cid,
            path: path.to_owned(),
            listener,
            ident: (meta.dev(), meta.ino()),
            epoll,
            slots: HashMap::new(),
            next_token: LISTENER + 1,
            conns: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            deadlines: VecDeque::new(),
            timer,
            connect_timeout: CONNECT_TIMEOUT,
        })
    }

    /// Starts the clock for `what`.
    fn start_deadline(&mut self, what: Waiting) {
        self.deadlines
            .push_back((Instant::now() + self.connect_timeout, what));
        if self.deadlines.len() == 1 {
            self.arm_timer();
        }
    }

    /// Arms the timer for the first deadline, or disarms it.
    fn arm_timer(&mut self) {
        let result = match self.deadlines.front() {
            // A zero duration would disarm it: at least a millisecond.
            Some((at, _)) => self.timer.reset(
                at.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            tracing::warn!("vsock: connect timer: {e}");
        }
    }

    /// Closes what waited too long: clients without their line, host-initiated connections the
    /// guest did not answer (with RST to the guest).
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(at, what)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            match what {
                Waiting::Line(token) => {
                    if let Some(Slot::Pending(p)) = self.slots.remove(&token) {
                        tracing::debug!("vsock: host client sent no CONNECT line in time");
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            p.stream.as_raw_fd(),
                            EpollEvent::default(),
                        );
                    }
                }
                Waiting::Guest(key, token) => {
                    let unanswered = matches!(
                        self.conns.get(&key),
                        Some((t, c)) if *t == token && c.state == State::LocalInit
                    );
                    if unanswered {
                        tracing::debug!("vsock: guest port {} did not answer in time", key.peer);
                        self.kill(key, true);
                    }
                }
            }
        }
        self.arm_timer();
    }

    /// Readable when a host socket has something for [`Muxer::process_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Forgets every connection (device reset); the listener stays.
    pub fn reset(&mut self) {
        for (_, slot) in self.slots.drain() {
            let fd = match &slot {
                Slot::Pending(p) => p.stream.as_raw_fd(),
                Slot::Conn(key) => match self.conns.get(key) {
                    Some((_, c)) => c.stream.as_raw_fd(),
                    None => continue,
                },
            };
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.conns.clear();
        self.control.clear();
        self.deadlines.clear();
        self.arm_timer();
    }

    /// Whether the device should stop taking TX packets until RX drains.
    pub fn control_full(&self) -> bool {
        self.control.len() >= CONTROL_SOFT_MAX
    }

    /// Whether something waits for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty()
            || self
                .conns
                .values()
                .any(|(_, c)| c.credit_update_due || c.wants_rx())
    }

    fn push_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= CONTROL_HARD_MAX {
            tracing::debug!("vsock: control queue full, dropping op {op} for {key:?}");
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    fn header(&self, key: Key, op: u16) -> Header {
        header(self.guest_cid, key, op)
    }

    fn register(&mut self, fd: RawFd, events: EventSet, slot: Slot) -> io::Result<u64> {
        let token = self.next_token;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        self.next_token += 1;
        self.slots.insert(token, slot);
        Ok(token)
    }

    fn conn_events() -> EventSet {
        EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
    }

    /// Forgets `key`, telling the guest with RST when `rst`.
    fn kill(&mut self, key: Key, rst: bool) {
        if let Some((token, c)) = self.conns.remove(&key) {
            self.slots.remove(&token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        if rst {
            self.push_control(key, op::RST, 0);
        }
    }

    fn apply(&mut self, key: Key, verdict: Verdict) {
        match verdict {
            Verdict::Keep => {}
            Verdict::Reset => self.kill(key, true),
            Verdict::Drop => self.kill(key, false),
        }
    }

    /// A packet the guest sent that could not be parsed: RST if it names a stream of ours.
    pub fn handle_bad_tx(&mut self, hdr: Option<Header>, why: &PacketError) {
        tracing::debug!("vsock: dropping a bad packet from the guest: {why}");
        if let Some(h) = hdr
            && h.src_cid == self.guest_cid
            && h.op != op::RST
        {
            let key = Key {
                local: h.dst_port,
                peer: h.src_port,
            };
            self.kill(key, true);
        }
    }

    /// A well-formed packet from the guest.
    pub fn handle_tx(&mut self, h: &Header, data: &[u8]) {
        if h.src_cid != self.guest_cid {
            tracing::debug!("vsock: dropping a packet from CID {}", h.src_cid);
            return;
        }
        let key = Key {
            local: h.dst_port,
            peer: h.src_port,
        };
        if h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            if h.op != op::RST {
                self.kill(key, true);
            }
            return;
        }
        let Some((_, c)) = self.conns.get_mut(&key) else {
            match h.op {
                op::REQUEST => self.connect_to_host(key, h),
                op::RST => {}
                _ => self.push_control(key, op::RST, 0),
            }
            return;
        };
        c.peer_credit(h);
        let verdict = match (h.op, c.state) {
            (op::RESPONSE, State::LocalInit) => {
                c.state = State::Established;
                let ok = format!("OK {}\n", key.local);
                // A fresh socket's buffer takes 16 bytes at once; if not, give up cleanly.
                match c.stream.write(ok.as_bytes()) {
                    Ok(n) if n == ok.len() => Verdict::Keep,
                    _ => Verdict::Reset,
                }
            }
            (op::RW, _) => c.guest_data(data),
            (op::CREDIT_UPDATE, _) => Verdict::Keep,
            (op::CREDIT_REQUEST, _) => {
                c.credit_update_due = true;
                Verdict::Keep
            }
            (op::SHUTDOWN, State::Established) => c.guest_shutdown(h.flags),
            (op::SHUTDOWN, State::LocalClosed) => Verdict::Reset,
            (op::RST, _) => Verdict::Drop,
            // REQUEST on a live stream, RESPONSE out of turn, unknown ops.
            _ => Verdict::Reset,
        };
        self.apply(key, verdict);
    }

    /// The guest's REQUEST to host port `key.local`: connect to `PATH_<port>`.
    fn connect_to_host(&mut self, key: Key, h: &Header) {
        if self.conns.len() >= MAX_CONNS {
            self.push_control(key, op::RST, 0);
            return;
        }
        let mut name = OsString::from(self.path.as_os_str());
        name.push(format!("_{}", key.local));
        let stream = match UnixStream::connect(&name) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("vsock: guest port {} -> {name:?}: {e}", key.peer);
                self.push_control(key, op::RST, 0);
                return;
            }
        };
        if self.add_conn(key, stream, State::Established).is_err() {
            self.push_control(key, op::RST, 0);
            return;
        }
        if let Some((_, c)) = self.conns.get_mut(&key) {
            c.peer_credit(h);
        }
        self.push_control(key, op::RESPONSE, 0);
    }

    /// Registers a stream; returns its slot token.
    fn add_conn(&mut self, key: Key, stream: UnixStream, state: State) -> io::Result<u64> {
        stream.set_nonblocking(true)?;
        let token = self.register(stream.as_raw_fd(), Self::conn_events(), Slot::Conn(key))?;
        self.conns
            .insert(key, (token, Connection::new(stream, state)));
        Ok(token)
    }

    /// Handles what is ready on the listener and the host sockets (without blocking).
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("vsock: epoll_wait: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let set = ev.event_set();
            match ev.data() {
                LISTENER => self.accept(),
                TIMER => self.expire(),
                token => match self.slots.get(&token) {
                    Some(Slot::Pending(_)) => self.read_connect_line(token),
                    Some(Slot::Conn(key)) => {
                        let key = *key;
                        self.conn_event(key, set);
                    }
                    None => {}
                },
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("vsock: accept: {e}");
                    }
                    return;
                }
            };
            let pending = self
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Pending(_)))
                .count();
            if pending >= MAX_PENDING || self.conns.len() >= MAX_CONNS {
                continue; // dropped: the client sees EOF
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            let pending = Slot::Pending(PendingHost {
                stream,
                line: Vec::new(),
            });
            if let Ok(token) = self.register(fd, EventSet::IN, pending) {
                self.start_deadline(Waiting::Line(token));
            }
        }
    }

    /// Reads a pending client's `CONNECT <port>\n` byte by byte (what follows the line is
    /// stream data and stays in the socket).
    fn read_connect_line(&mut self, token: u64) {
        let Some(Slot::Pending(p)) = self.slots.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match p.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break true,
                Ok(1) if p.line.len() < MAX_LINE => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => break false, // EOF, error or an overlong line
            }
        };
        let Some(Slot::Pending(p)) = self.slots.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let port = done.then(|| parse_connect(&p.line)).flatten();
        let Some(port) = port else {
            tracing::debug!(
                "vsock: bad host request {:?}",
                String::from_utf8_lossy(&p.line)
            );
            return;
        };
        let Some(local) = self.alloc_local_port() else {
            return;
        };
        let key = Key { local, peer: port };
        if let Ok(token) = self.add_conn(key, p.stream, State::LocalInit) {
            self.push_control(key, op::REQUEST, 0);
            self.start_deadline(Waiting::Guest(key, token));
        }
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNS {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local == port) {
                return Some(port);
            }
        }
        None
    }

    fn conn_event(&mut self, key: Key, set: EventSet) {
        let Some((_, c)) = self.conns.get_mut(&key) else {
            return;
        };
        if set
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.readable = true;
        }
        if set.contains(EventSet::OUT) {
            let verdict = c.flush();
            self.apply(key, verdict);
        }
    }

    /// The next packet for the guest, its payload read into `buf` (the room the RX buffer has
    /// after the header). `None`: nothing to send now.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        while let Some(ctl) = self.control.pop_front() {
            let mut h = self.header(ctl.key, ctl.op);
            h.flags = ctl.flags;
            match self.conns.get_mut(&ctl.key) {
                Some((_, c)) => c.stamp(&mut h),
                // Only RST outlives its connection.
                None if ctl.op != op::RST => continue,
                None => {}
            }
            return Some((h, 0));
        }
        let due = self
            .conns
            .iter()
            .find(|(_, (_, c))| c.credit_update_due)
            .map(|(k, _)| *k);
        if let Some(key) = due {
            let mut h = self.header(key, op::CREDIT_UPDATE);
            if let Some((_, c)) = self.conns.get_mut(&key) {
                c.credit_update_due = false;
                c.stamp(&mut h);
            }
            return Some((h, 0));
        }
        if buf.is_empty() {
            return None;
        }
        let ready: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, (_, c))| c.wants_rx())
            .map(|(k, _)| *k)
            .collect();
        let cid = self.guest_cid;
        for key in ready {
            let Some((_, c)) = self.conns.get_mut(&key) else {
                continue;
            };
            match c.read_host(buf) {
                Ok(0) => {
                    // The host closed: we will neither send nor receive more.
                    c.state = State::LocalClosed;
                    let mut h = header(cid, key, op::SHUTDOWN);
                    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    c.stamp(&mut h);
                    return Some((h, 0));
                }
                Ok(n) => {
                    let mut h = header(cid, key, op::RW);
                    h.len = n as u32;
                    c.stamp(&mut h);
                    return Some((h, n));
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    self.kill(key, false);
                    return Some((self.header(key, op::RST), 0));
                }
            }
        }
        None
    }
}

/// A header from the host's `key.local` to the guest's `key.peer`.
fn header(guest_cid: u64, key: Key, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local,
        dst_port: key.peer,
        type_: TYPE_STREAM,
        op,
        ..Default::default()
    }
}

/// `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    port.parse().ok()
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file if it is still the one we bound.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.ident
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn bind_replaces_stale_socket_and_refuses_live_one() {
        let dir = std::env::temp_dir().join(format!("hp-vsock-bind-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        // A stale socket file (its listener is gone).
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let m = Muxer::bind(3, &path).unwrap();
        // While it listens, a second VMM is refused.
        let e = Muxer::bind(4, &path).err().unwrap();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(m);
        assert!(!path.exists(), "removed on drop");
        // A regular file is not ours to remove.
        std::fs::write(&path, b"x").unwrap();
        assert!(Muxer::bind(3, &path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Pumps host events until `done` (at most 5 s).
    fn pump(m: &mut Muxer, mut done: impl FnMut(&mut Muxer) -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            m.process_host_events();
            if done(m) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn guest_header(m: &Muxer, key: Key, op: u16) -> Header {
        Header {
            src_cid: m.guest_cid,
            dst_cid: HOST_CID,
            src_port: key.peer,
            dst_port: key.local,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 16,
            ..Default::default()
        }
    }

    #[test]
    fn a_connect_the_guest_never_answers_is_closed_after_the_timeout() {
        let dir = std::env::temp_dir().join(format!("hp-vsock-timeout-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("v.sock");
        let mut m = Muxer::bind(3, &path).unwrap();
        m.connect_timeout = Duration::from_millis(200);

        let mut silent = UnixStream::connect(&path).unwrap();
        silent.write_all(b"CONNECT 5000\n").unwrap();
        let mut answered = UnixStream::connect(&path).unwrap();
        answered.write_all(b"CONNECT 5001\n").unwrap();
        let mut no_line = UnixStream::connect(&path).unwrap();
        no_line.write_all(b"CONN").unwrap();
        let started = Instant::now();

        let mut requests = Vec::new();
        assert!(pump(&mut m, |m| {
            while let Some((h, _)) = m.next_rx(&mut []) {
                requests.push(h);
            }
            requests.len() == 2
        }));
        assert!(requests.iter().all(|h| h.op == op::REQUEST));
        let key_of = |port: u32| {
            let h = requests.iter().find(|h| h.dst_port == port).unwrap();
            Key {
                local: h.src_port,
                peer: port,
            }
        };
        let (silent_key, answered_key) = (key_of(5000), key_of(5001));
        m.handle_tx(&guest_header(&m, answered_key, op::RESPONSE), &[]);

        // Nothing for the guest until the timeout; then RST for the silent one only.
        let mut rst = None;
        assert!(pump(&mut m, |m| {
            rst = m.next_rx(&mut []);
            rst.is_some()
        }));
        assert!(started.elapsed() >= Duration::from_millis(200));
        let rst = rst.unwrap();
        assert_eq!(rst.0.op, op::RST);
        assert_eq!((rst.0.src_port, rst.0.dst_port), (silent_key.local, 5000));
        assert!(pump(&mut m, |m| m.deadlines.is_empty()));
        assert!(m.next_rx(&mut []).is_none(), "no RST for the answered one");

        // The silent one's client reads EOF, not OK; so does the one without a line.
        let mut buf = [0u8; 32];
        for client in [&mut silent, &mut no_line] {
            client
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            assert_eq!(client.read(&mut buf).unwrap(), 0);
        }
        // The answered one is established and stays so.
        answered
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let n = answered.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("OK {}\n", answered_key.local).as_bytes());
        assert!(m.conns.contains_key(&answered_key));

        // A late RESPONSE for the expired stream is answered with RST.
        m.handle_tx(&guest_header(&m, silent_key, op::RESPONSE), &[]);
        assert_eq!(m.next_rx(&mut []).unwrap().0.op, op::RST);
        drop(m);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
