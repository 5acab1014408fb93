//! Serving frontends one at a time on a listening Unix socket. A frontend that disconnects, or
//! sends what we refuse, is dropped and the device reset; the next connection (a restarted
//! VMM, QEMU's `reconnect=`) starts from scratch.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error};

use super::DeviceBackend;

/// The device shared between the connection being served and whoever needs to reset it.
pub type SharedBackend = Arc<Mutex<DeviceBackend>>;

/// Why a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// The frontend closed the socket.
    Disconnected,
    /// We dropped it after a request we refused or a broken message.
    Refused(Error),
}

/// Serves one frontend until it goes away or sends something we refuse; then resets the device.
pub fn serve_connection(stream: UnixStream, backend: &SharedBackend) -> Ended {
    let mut handler = BackendReqHandler::from_stream(stream, backend.clone());
    let ended = loop {
        match handler.handle_request() {
            Ok(()) => {}
            Err(Error::Disconnected) => break Ended::Disconnected,
            // A request the negotiation does not allow yet, refused before it did anything:
            // QEMU's vhost-user net enables rings before it sets features, and enables them
            // again once it has.
            Err(e @ (Error::InactiveFeature(_) | Error::InactiveOperation(_))) => {
                tracing::debug!("ignored a request: {e}");
            }
            Err(e) => break Ended::Refused(e),
        }
    };
    drop(handler);
    backend
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .disconnect();
    ended
}

/// Accepts frontends on `listener`, one at a time, forever (or until `accept` fails).
pub fn serve(listener: &UnixListener, backend: &SharedBackend, name: &str) -> io::Result<()> {
    loop {
        let (stream, _) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        tracing::info!("{name}: frontend connected");
        match serve_connection(stream, backend) {
            Ended::Disconnected => tracing::info!("{name}: frontend disconnected; device reset"),
            Ended::Refused(e) => {
                tracing::warn!("{name}: dropped the frontend: {e}; device reset")
            }
        }
    }
}
