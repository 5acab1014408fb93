//! An API connection whose reads are `recvmsg(2)`: file descriptors a client sends as
//! SCM_RIGHTS ancillary data (Kata Containers passes TAP fds this way, as Cloud Hypervisor
//! accepts them) are collected per connection, for the request handler to take.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// Most fds taken from one read; more in one message are closed by the kernel (MSG_CTRUNC).
const MAX_FDS: usize = 32;

/// The fds received on one connection and not yet taken. Whatever is never taken is closed
/// with the connection.
#[derive(Clone, Default)]
pub struct ReceivedFds(Arc<Mutex<Vec<OwnedFd>>>);

impl ReceivedFds {
    /// Everything received so far (the request being handled came with these).
    pub fn take(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn push(&self, fds: impl IntoIterator<Item = OwnedFd>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend(fds);
    }
}

pub struct FdStream {
    inner: UnixStream,
    fds: ReceivedFds,
}

impl FdStream {
    pub fn new(inner: UnixStream, fds: ReceivedFds) -> Self {
        Self { inner, fds }
    }
}

/// One `recvmsg`: the bytes go to `buf`, the fds to `fds`.
fn receive(fd: RawFd, buf: &mut [u8], fds: &ReceivedFds) -> io::Result<usize> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS just installed these descriptors in this process; nothing else
            // knows them, so each gets exactly one owner here.
            fds.push(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        tracing::warn!("API: more than {MAX_FDS} fds in one message; the rest were dropped");
    }
    Ok(msg.bytes)
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.inner.poll_read_ready(cx))?;
            let fd = this.inner.as_raw_fd();
            let fds = &this.fds;
            let unfilled = buf.initialize_unfilled();
            match this
                .inner
                .try_io(Interest::READABLE, || receive(fd, unfilled, fds))
            {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, sendmsg};
    use std::io::IoSlice;
    use tokio::io::AsyncReadExt;

    #[test]
    fn bytes_are_read_and_fds_collected() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = UnixStream::pair().unwrap();
            let file = std::fs::File::open("/proc/self/exe").unwrap();
            let raw = [file.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                a.as_raw_fd(),
                &[IoSlice::new(b"hello")],
                &cmsg,
                MsgFlags::empty(),
                None,
            )
            .unwrap();
            let fds = ReceivedFds::default();
            let mut stream = FdStream::new(b, fds.clone());
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello");
            let got = fds.take();
            assert_eq!(got.len(), 1);
            assert_ne!(got[0].as_raw_fd(), file.as_raw_fd(), "a new descriptor");
            assert!(fds.take().is_empty(), "taken once");
        });
    }
}
