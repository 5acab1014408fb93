//! How a device (or a vCPU, or a signal) asks the VMM to end or restart the VM.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why the VM should stop running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitRequest {
    /// The guest powered off (ACPI S5 or a KVM system event).
    Poweroff,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register, KVM system event).
    Reset,
    /// The guest wrote `code` to the debug-exit port; the process exits with `(code << 1) | 1`.
    DebugExit(u8),
    /// The host asked us to stop (SIGTERM, SIGINT).
    Signal(i32),
    /// The VMM's API stopped (or is rebooting) the VM.
    Stop,
    /// Something the guest did is fatal (triple fault, KVM internal error); the text says what.
    GuestFatal(String),
    /// The VMM itself failed while running the guest.
    VmmError(String),
}

/// A one-shot latch: the first request wins, later ones are ignored, waiters wake once.
#[derive(Default)]
pub struct ExitSignal {
    request: Mutex<Option<ExitRequest>>,
    cond: Condvar,
}

impl ExitSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `request` unless an earlier one is already recorded.
    pub fn request(&self, request: ExitRequest) {
        let mut slot = self.request.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(request);
            self.cond.notify_all();
        }
    }

    /// The recorded request, if any.
    pub fn pending(&self) -> Option<ExitRequest> {
        self.request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_set(&self) -> bool {
        self.pending().is_some()
    }

    /// Blocks until a request is recorded and returns it.
    pub fn wait(&self) -> ExitRequest {
        let mut slot = self.request.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = slot.as_ref() {
                return r.clone();
            }
            slot = self.cond.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Like [`ExitSignal::wait`] but gives up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitRequest> {
        let slot = self.request.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _) = self
            .cond
            .wait_timeout_while(slot, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_request_wins() {
        let s = ExitSignal::new();
        assert!(!s.is_set());
        s.request(ExitRequest::DebugExit(3));
        s.request(ExitRequest::Poweroff);
        assert_eq!(s.wait(), ExitRequest::DebugExit(3));
    }

    #[test]
    fn wakes_a_waiter_on_another_thread() {
        let s = Arc::new(ExitSignal::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait());
        std::thread::sleep(Duration::from_millis(20));
        s.request(ExitRequest::Reset);
        assert_eq!(t.join().unwrap(), ExitRequest::Reset);
        assert_eq!(
            ExitSignal::new().wait_timeout(Duration::from_millis(1)),
            None
        );
    }
}
