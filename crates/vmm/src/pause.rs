//! Pausing vCPUs: each vCPU thread parks at a gate between two KVM_RUN calls while the VM is
//! paused, so the guest's state stays in KVM and nothing of it runs.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use hyperpool_devices::ExitSignal;

#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    cond: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
}

/// How often a parked vCPU looks whether the VM is being torn down.
const EXIT_POLL: Duration = Duration::from_millis(100);

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread before it enters the guest: returns at once unless the VM is
    /// paused; otherwise waits until it is resumed or stopped.
    pub fn park_if_paused(&self, exit: &ExitSignal) {
        let mut state = self.lock();
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.cond.notify_all();
        while state.paused && !exit.is_set() {
            state = self
                .cond
                .wait_timeout(state, EXIT_POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.parked -= 1;
        self.cond.notify_all();
    }

    /// Asks the vCPUs to park; they do at their next exit (the caller kicks them out of KVM_RUN).
    pub fn close(&self) {
        self.lock().paused = true;
    }

    /// Waits until `count` vCPUs are parked or `timeout` passes; true if they all are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .cond
            .wait_timeout_while(state, timeout, |s| s.paused && s.parked < count)
            .unwrap_or_else(|p| p.into_inner());
        state.parked >= count
    }

    pub fn open(&self) {
        self.lock().paused = false;
        self.cond.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn vcpus_park_while_closed_and_run_when_opened() {
        let gate = Arc::new(PauseGate::default());
        let exit = Arc::new(ExitSignal::new());
        let runs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (gate, exit, runs) = (gate.clone(), exit.clone(), runs.clone());
                std::thread::spawn(move || {
                    while !exit.is_set() {
                        gate.park_if_paused(&exit);
                        runs.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        gate.close();
        assert!(gate.wait_parked(3, Duration::from_secs(5)));
        let before = runs.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            runs.load(Ordering::Relaxed),
            before,
            "nothing runs while paused"
        );
        gate.open();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            runs.load(Ordering::Relaxed) > before,
            "runs again once resumed"
        );
        // A stop while paused releases parked threads.
        gate.close();
        assert!(gate.wait_parked(3, Duration::from_secs(5)));
        exit.request(hyperpool_devices::ExitRequest::Poweroff);
        for t in threads {
            t.join().unwrap();
        }
    }
}
