//! One vsock stream between a guest port and a host Unix socket: its state, both directions'
//! credit (virtio 1.2 §5.10.6.3), and the bounded buffer for guest data the host socket has not
//! taken yet.
//!
//! Credit: we tell the guest `buf_alloc` = [`CONN_BUF`] and `fwd_cnt` = bytes handed to the
//! Unix socket; a guest that sends more than that allows is reset, so at most [`CONN_BUF`]
//! bytes are ever buffered per connection. The other way, we read from the Unix socket only as
//! much as the guest's last `buf_alloc`/`fwd_cnt` leave room for.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// Receive buffer we advertise to the guest per connection.
pub const CONN_BUF: u32 = 64 * 1024;
/// Send a credit update unprompted once the guest's view of our free space falls below this.
const CREDIT_LOW: u32 = CONN_BUF / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    LocalInit,
    Established,
    /// The host side closed; SHUTDOWN sent, waiting for the guest's RST.
    LocalClosed,
}

/// What the muxer must do after a packet from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Send RST to the guest and forget the connection.
    Reset,
    /// Forget the connection silently (the guest sent RST).
    Drop,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Guest data not yet taken by the Unix socket (at most [`CONN_BUF`]).
    out: VecDeque<u8>,
    /// Bytes of guest data received / forwarded to the socket (free-running).
    recv_cnt: u32,
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes sent to the guest, and the guest's last buffer report.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The Unix socket may have data (edge-triggered: cleared only on `WouldBlock`).
    pub readable: bool,
    /// A credit update for the guest is owed.
    pub credit_update_due: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            out: VecDeque::new(),
            recv_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            peer_shutdown: 0,
            readable: false,
            credit_update_due: false,
        }
    }

    /// Fills our credit fields into a header going to the guest.
    pub fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = CONN_BUF;
        hdr.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_sent = self.fwd_cnt;
    }

    /// Bytes the guest can still take (0 if its report is inconsistent).
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether there is host data to read and the guest can take some of it.
    pub fn wants_rx(&self) -> bool {
        self.state == State::Established
            && self.readable
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_free() > 0
    }

    /// Reads at most `buf.len()` bytes of host data for the guest. `Ok(0)` is end of stream.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf.len().min(self.peer_free() as usize);
        match self.stream.read(&mut buf[..max]) {
            Ok(n) => {
                self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                Ok(n)
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.readable = false;
                }
                Err(e)
            }
        }
    }

    /// Takes the guest's buffer report from any packet of this connection.
    pub fn peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Guest data: written through to the socket, the rest buffered within credit.
    pub fn guest_data(&mut self, data: &[u8]) -> Verdict {
        if self.state != State::Established || self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Verdict::Reset;
        }
        let unforwarded = self.recv_cnt.wrapping_sub(self.fwd_cnt);
        if u64::from(unforwarded) + data.len() as u64 > u64::from(CONN_BUF) {
            tracing::debug!("vsock: guest ignored our credit");
            return Verdict::Reset;
        }
        self.recv_cnt = self.recv_cnt.wrapping_add(data.len() as u32);
        self.out.extend(data);
        self.flush()
    }

    /// Writes buffered guest data to the socket (call again when it is writable).
    pub fn flush(&mut self) -> Verdict {
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.out.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Reset,
            }
        }
        if self.out.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        // The guest sees recv_cnt - fwd_cnt_sent in use; tell it about freed space in time.
        let guest_view_free =
            CONN_BUF.saturating_sub(self.recv_cnt.wrapping_sub(self.fwd_cnt_sent));
        if self.fwd_cnt != self.fwd_cnt_sent && guest_view_free < CREDIT_LOW {
            self.credit_update_due = true;
        }
        Verdict::Keep
    }

    /// The guest's SHUTDOWN. Both directions closed: flush what the socket takes, then RST
    /// (as Linux does, the connection ends once both sides are done).
    pub fn guest_shutdown(&mut self, flags: u32) -> Verdict {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        let v = self.flush();
        if v != Verdict::Keep {
            return v;
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            return Verdict::Reset;
        }
        Verdict::Keep
    }
}
