//! The thread of an active vhost-user device that turns the backend's "used buffers" eventfds
//! into the guest's interrupts.
//!
//! Interrupts go through [`DeviceInterrupt::signal_queue`] rather than handing the backend the
//! MSI-X vector's irqfd: the vector a queue uses, its mask bit and MSI-X's enable bit can all
//! change while the device runs, and INTx needs the ISR set; the transport's sink already
//! handles each case, and a direct irqfd would bypass it. The cost is one thread wake-up per
//! interrupt (guest notifications still go straight to the backend on the ioeventfd).
//!
//! [`DeviceInterrupt::signal_queue`]: crate::virtio::DeviceInterrupt::signal_queue

use std::io;
use std::sync::Arc;

use super::device::{Session, VhostUserCounters};
use crate::virtio::worker::{Next, QueueWorker};

/// Starts the relay for `session`; dropping the worker stops it.
pub(super) fn spawn(
    name: &str,
    session: &Arc<Session>,
    counters: Arc<VhostUserCounters>,
) -> io::Result<QueueWorker> {
    let calls = session
        .rings
        .iter()
        .map(|r| Ok((r.index, r.call.try_clone()?)))
        .collect::<io::Result<Vec<_>>>()?;
    let interrupt = session.interrupt.clone();
    let name = name.to_owned();
    QueueWorker::spawn(format!("vhost-user-{name}"), calls, move |queue| {
        counters.interrupts.inc();
        if let Err(e) = interrupt.signal_queue(queue) {
            tracing::warn!("vhost-user {name}: interrupt: {e}");
        }
        Next::Continue
    })
}
