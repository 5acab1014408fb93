//! virtio-console (id 3): one port (no MULTIPORT), so two queues: receiveq 0 (host to guest)
//! and transmitq 1 (guest to host). Configuration: cols and rows 0 (no SIZE), one port.
//!
//! What the guest transmits goes to a writer (the terminal, a file, or nowhere). Host input is
//! pushed through a [`ConsoleInput`] into a small bounded buffer ([`INPUT_CAPACITY`]) and copied
//! into the guest's receive buffers as the guest posts them; when the buffer is full, `push`
//! takes nothing and the producer waits, so input is held back rather than queued without bound.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap, Permissions,
};
use vmm_sys_util::eventfd::EventFd;

use super::chain::ChainError;
use super::device::{ActivateError, ActivatedQueue, VirtioDevice};
use super::interrupt::DeviceInterrupt;
use super::worker::{QueueWorker, Served, after_serving};
use super::{GuestMemoryHandle, features};

#[cfg(test)]
mod tests;

/// Host input held for the guest at most (bytes).
pub const INPUT_CAPACITY: usize = 4096;

const QUEUE_SIZES: [u16; 2] = [256, 256];
const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;
/// The worker's token for "host input arrived" (not a queue index).
const INPUT_EVENT: usize = 2;
/// `struct virtio_console_config`: cols, rows (u16), max_nr_ports, emerg_wr (u32).
const CONFIG_SIZE: usize = 12;

/// The host side of the console's input: bytes pushed here reach the guest's receiveq.
#[derive(Clone)]
pub struct ConsoleInput(Arc<InputInner>);

struct InputInner {
    pending: Mutex<VecDeque<u8>>,
    /// Written when bytes arrive; wakes the device thread.
    wake: EventFd,
}

impl ConsoleInput {
    fn new() -> io::Result<Self> {
        Ok(Self(Arc::new(InputInner {
            pending: Mutex::new(VecDeque::with_capacity(INPUT_CAPACITY)),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })))
    }

    /// Queues as much of `bytes` as there is room for; returns how many were taken (0 while the
    /// guest has not taken what is already held).
    pub fn push(&self, bytes: &[u8]) -> usize {
        let mut pending = self.pending();
        let n = (INPUT_CAPACITY - pending.len()).min(bytes.len());
        if n == 0 {
            return 0;
        }
        pending.extend(&bytes[..n]);
        drop(pending);
        if let Err(e) = self.0.wake.write(1) {
            tracing::warn!("virtio-console: waking the device thread: {e}");
        }
        n
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.0.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_empty(&self) -> bool {
        self.pending().is_empty()
    }
}

/// The virtio console device.
pub struct Console {
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    input: ConsoleInput,
    worker: Option<QueueWorker>,
}

impl Console {
    /// A console whose guest output goes to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> io::Result<Self> {
        Ok(Self {
            output: Arc::new(Mutex::new(output)),
            input: ConsoleInput::new()?,
            worker: None,
        })
    }

    /// Where host input for the guest goes.
    pub fn input(&self) -> ConsoleInput {
        self.input.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        features::BASE
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        // cols = rows = 0; max_nr_ports = 1; emerg_wr = 0.
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        let start = usize::try_from(offset)
            .unwrap_or(CONFIG_SIZE)
            .min(CONFIG_SIZE);
        let end = start.saturating_add(data.len()).min(CONFIG_SIZE);
        data.fill(0);
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryHandle,
        _features: u64,
        queues: Vec<ActivatedQueue>,
        interrupt: DeviceInterrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let mut rx = None;
        let mut tx = None;
        for q in queues {
            match q.index {
                RECEIVEQ => rx = Some(q),
                TRANSMITQ => tx = Some(q),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        self.reset();
        let thread_err = ActivateError::Thread;
        let tx_kick = tx.event.try_clone().map_err(thread_err)?;
        let input_wake = self.input.0.wake.try_clone().map_err(thread_err)?;
        let input_kick = self.input.0.wake.try_clone().map_err(thread_err)?;
        let mut state = Server {
            rx: rx.queue,
            tx: tx.queue,
            input: self.input.clone(),
            output: self.output.clone(),
            output_failed: false,
        };
        let events = vec![
            (RECEIVEQ, rx.event),
            (TRANSMITQ, tx.event),
            (INPUT_EVENT, input_wake),
        ];
        let worker = QueueWorker::spawn("virtio-console".into(), events, move |token| {
            let guard = mem.memory();
            let (served, kick) = if token == TRANSMITQ {
                (state.transmit(&guard, &interrupt), &tx_kick)
            } else {
                (state.receive(&guard, &interrupt), &input_kick)
            };
            after_serving(served, kick, &interrupt)
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

/// The device thread's state.
struct Server {
    rx: Queue,
    tx: Queue,
    input: ConsoleInput,
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    /// The output failed once (logged); later output is dropped.
    output_failed: bool,
}

/// Turns notifications off and checks the avail index is plausible.
fn begin(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), ChainError> {
    queue.disable_notification(mem)?;
    let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
    let next = queue.next_avail();
    if avail.wrapping_sub(next) > queue.size() {
        return Err(ChainError::AvailIndex { avail, next });
    }
    Ok(())
}

fn check(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
    perm: Permissions,
) -> Result<(), ChainError> {
    if GuestMemory::check_range(mem, addr, len as usize, perm) {
        Ok(())
    } else {
        Err(ChainError::BadBuffer { addr: addr.0, len })
    }
}

impl Server {
    /// Writes the transmitq's buffers to the output (at most a queue's worth of chains).
    fn transmit(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &DeviceInterrupt,
    ) -> Result<Served, ChainError> {
        let mut used_any = false;
        let mut budget = usize::from(self.tx.size());
        let mut out = self.output.lock().unwrap_or_else(|p| p.into_inner());
        let mut chunk = [0u8; 4096];
        let served = loop {
            begin(&mut self.tx, mem)?;
            while budget > 0 {
                let Some(chain) = self.tx.pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let (mut count, mut ends) = (0usize, false);
                for desc in chain {
                    count += 1;
                    ends = !desc.has_next();
                    // Device-writable buffers have no place on the transmitq: skipped.
                    if desc.is_write_only() {
                        continue;
                    }
                    check(mem, desc.addr(), desc.len(), Permissions::Read)?;
                    let bad = || ChainError::BadBuffer {
                        addr: desc.addr().0,
                        len: desc.len(),
                    };
                    let mut done = 0u32;
                    while done < desc.len() {
                        let n = (desc.len() - done).min(chunk.len() as u32);
                        let at = desc.addr().checked_add(u64::from(done)).ok_or_else(bad)?;
                        mem.read_slice(&mut chunk[..n as usize], at)
                            .map_err(|_| bad())?;
                        if !self.output_failed {
                            if let Err(e) = out.write_all(&chunk[..n as usize]) {
                                tracing::warn!("virtio-console: output: {e}; dropping output");
                                self.output_failed = true;
                            }
                        }
                        done += n;
                    }
                }
                // The iterator stops silently on a loop, a bad index, an unreadable descriptor
                // or a bad indirect table; a well-formed chain ends on a descriptor without NEXT.
                if count == 0 || !ends {
                    return Err(ChainError::BadChain { head });
                }
                self.tx.add_used(mem, head, 0)?;
                used_any = true;
            }
            if budget == 0 {
                break Served::Batch;
            }
            if !self.tx.enable_notification(mem)? {
                break Served::All;
            }
        };
        if used_any && !self.output_failed {
            if let Err(e) = out.flush() {
                tracing::warn!("virtio-console: output: {e}; dropping output");
                self.output_failed = true;
            }
        }
        drop(out);
        if used_any && self.tx.needs_notification(mem)? {
            if let Err(e) = interrupt.signal_queue(TRANSMITQ) {
                tracing::warn!("virtio-console: interrupt: {e}");
            }
        }
        Ok(served)
    }

    /// Copies held input into the receiveq's buffers (at most a queue's worth of chains); a
    /// buffer is taken only when there is input for it.
    fn receive(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &DeviceInterrupt,
    ) -> Result<Served, ChainError> {
        let mut used_any = false;
        let mut budget = usize::from(self.rx.size());
        let served = loop {
            begin(&mut self.rx, mem)?;
            while budget > 0 && !self.input.is_empty() {
                let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let (mut count, mut ends, mut written) = (0usize, false, 0u32);
                let mut pending = self.input.pending();
                for desc in chain {
                    count += 1;
                    ends = !desc.has_next();
                    // Device-readable buffers have no place on the receiveq: skipped.
                    if !desc.is_write_only() {
                        continue;
                    }
                    check(mem, desc.addr(), desc.len(), Permissions::Write)?;
                    let n = pending.len().min(desc.len() as usize);
                    if n == 0 {
                        continue;
                    }
                    let bytes: Vec<u8> = pending.range(..n).copied().collect();
                    mem.write_slice(&bytes, desc.addr())
                        .map_err(|_| ChainError::BadBuffer {
                            addr: desc.addr().0,
                            len: desc.len(),
                        })?;
                    pending.drain(..n);
                    written += n as u32;
                }
                drop(pending);
                if count == 0 || !ends {
                    return Err(ChainError::BadChain { head });
                }
                self.rx.add_used(mem, head, written)?;
                used_any = true;
            }
            if budget == 0 {
                break Served::Batch;
            }
            // Notifications stay on while we wait for buffers (or input).
            if !self.rx.enable_notification(mem)? || self.input.is_empty() {
                break Served::All;
            }
        };
        if used_any && self.rx.needs_notification(mem)? {
            if let Err(e) = interrupt.signal_queue(RECEIVEQ) {
                tracing::warn!("virtio-console: interrupt: {e}");
            }
        }
        Ok(served)
    }
}
