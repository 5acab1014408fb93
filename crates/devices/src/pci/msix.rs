//! MSI-X: the capability, the vector table and pending-bit array a device exposes in a BAR, and
//! the interrupt path from a device to the guest.
//!
//! Each vector owns an [`IrqLine`] (an eventfd KVM knows as an irqfd for one GSI). The VMM routes
//! that GSI to the vector's MSI message ([`MsiRouting`]); devices raise vector `n` with
//! [`MsixInterrupts::trigger`], which writes the eventfd, or sets the pending bit while the vector
//! or the whole function is masked and fires it on unmask, as the PCI spec requires.
//!
//! Routes change only when an unmasked vector's message differs from the one KVM already has, so
//! the guest's usual "program while masked, then unmask once" costs one routing update per vector.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::irq::IrqLine;
use crate::pci::config::{ConfigError, ConfigSpace};

pub const CAPABILITY_ID: u8 = 0x11;
/// Message control: MSI-X enable and function mask; the low 11 bits are the table size - 1.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const VECTOR_CONTROL_MASKED: u32 = 1;
/// The spec's limit (table size field is 11 bits).
pub const MAX_VECTORS: u16 = 2048;

/// One MSI message: where the guest wants the write, and what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VMM side of MSI: points a GSI at an MSI message (KVM_SET_GSI_ROUTING).
pub trait MsiRouting: Send + Sync {
    fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()>;
}

/// Where the table and PBA live: BAR index and offset within it (offsets 8-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

impl MsixLayout {
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    /// Vectors come out of reset masked.
    fn default() -> Self {
        Self {
            address_lo: 0,
            address_hi: 0,
            data: 0,
            control: VECTOR_CONTROL_MASKED,
        }
    }
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.address_hi) << 32) | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

/// A function's MSI-X state. Shared (behind [`MsixInterrupts`]) by the PCI bus, which forwards
/// guest accesses, and the device, which raises vectors.
pub struct Msix {
    layout: MsixLayout,
    entries: Vec<Entry>,
    pba: Vec<u64>,
    control: u16,
    vectors: Vec<IrqLine>,
    /// The message KVM currently routes each vector's GSI to.
    routed: Vec<Option<MsiMessage>>,
    router: Arc<dyn MsiRouting>,
    cap_offset: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error(
        "MSI-X wants 1..={MAX_VECTORS} vectors, one interrupt line each; got {vectors} vectors and {lines} lines"
    )]
    BadVectorCount { vectors: u16, lines: usize },
    #[error("MSI-X table or PBA offset is not 8-byte aligned, or the BAR index is above 5")]
    BadLayout,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Msix {
    /// MSI-X for `layout.vectors` vectors, raised through `lines` (one per vector, already
    /// registered as irqfds), with its capability appended to `config`.
    pub fn new(
        layout: MsixLayout,
        lines: Vec<IrqLine>,
        router: Arc<dyn MsiRouting>,
        config: &mut ConfigSpace,
    ) -> Result<Self, MsixError> {
        let n = layout.vectors;
        if n == 0 || n > MAX_VECTORS || lines.len() != usize::from(n) {
            return Err(MsixError::BadVectorCount {
                vectors: n,
                lines: lines.len(),
            });
        }
        if layout.table_bar > 5
            || layout.pba_bar > 5
            || layout.table_offset % 8 != 0
            || layout.pba_offset % 8 != 0
        {
            return Err(MsixError::BadLayout);
        }
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(n - 1).to_le_bytes());
        body.extend_from_slice(&(layout.table_offset | u32::from(layout.table_bar)).to_le_bytes());
        body.extend_from_slice(&(layout.pba_offset | u32::from(layout.pba_bar)).to_le_bytes());
        let mask = (CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes();
        let cap_offset = config.add_capability(CAPABILITY_ID, &body, &mask)?;
        Ok(Self {
            layout,
            entries: vec![Entry::default(); usize::from(n)],
            pba: vec![0; usize::from(n).div_ceil(64)],
            control: 0,
            vectors: lines,
            routed: vec![None; usize::from(n)],
            router,
            cap_offset,
        })
    }

    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// Offset of the message control register in configuration space.
    pub fn control_offset(&self) -> usize {
        self.cap_offset + 2
    }

    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    fn vector_masked(&self, v: usize) -> bool {
        !self.enabled()
            || self.control & CONTROL_FUNCTION_MASK != 0
            || self.entries[v].control & VECTOR_CONTROL_MASKED != 0
    }

    /// The guest wrote message control (the bus passes the value config space now holds).
    pub fn set_control(&mut self, control: u16) {
        self.control = control & (CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        for v in 0..self.entries.len() {
            self.refresh(v);
        }
    }

    /// After a state change of vector `v`: keep KVM's route current while it is unmasked, and
    /// deliver what was held pending while it was masked.
    fn refresh(&mut self, v: usize) {
        if self.vector_masked(v) {
            return;
        }
        let msg = self.entries[v].message();
        if self.routed[v] != Some(msg) {
            match self.router.route(self.vectors[v].gsi(), msg) {
                Ok(()) => self.routed[v] = Some(msg),
                Err(e) => tracing::warn!("MSI-X vector {v}: routing failed: {e}"),
            }
        }
        if self.take_pending(v) {
            self.fire(v);
        }
    }

    fn take_pending(&mut self, v: usize) -> bool {
        let (word, bit) = (v / 64, 1u64 << (v % 64));
        let was = self.pba[word] & bit != 0;
        self.pba[word] &= !bit;
        was
    }

    fn fire(&self, v: usize) {
        if let Err(e) = self.vectors[v].raise() {
            tracing::warn!("MSI-X vector {v}: eventfd write failed: {e}");
        }
    }

    /// Raises vector `v`, or marks it pending while masked. Unknown vectors are ignored.
    pub fn trigger(&mut self, v: u16) {
        let v = usize::from(v);
        if v >= self.entries.len() {
            return;
        }
        if self.vector_masked(v) {
            self.pba[v / 64] |= 1 << (v % 64);
        } else {
            self.fire(v);
        }
    }

    /// Guest read of the table. Only aligned 4- and 8-byte accesses are defined; others read 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((v, reg)) = self.table_slot(offset, data.len()) else {
            return;
        };
        let e = &self.entries[v];
        let regs = [e.address_lo, e.address_hi, e.data, e.control];
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&regs[reg + i].to_le_bytes());
        }
    }

    /// Guest write of the table (same access rules as reads; anything else is dropped).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((v, reg)) = self.table_slot(offset, data.len()) else {
            return;
        };
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut self.entries[v];
            match reg + i {
                0 => e.address_lo = value & !0b11,
                1 => e.address_hi = value,
                2 => e.data = value,
                _ => e.control = value & VECTOR_CONTROL_MASKED,
            }
        }
        self.refresh(v);
    }

    /// (vector, first dword register) of a valid table access.
    fn table_slot(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !(len == 4 || len == 8) || offset % len as u64 != 0 {
            return None;
        }
        let v = usize::try_from(offset / ENTRY_SIZE).ok()?;
        let reg = (offset % ENTRY_SIZE / 4) as usize;
        (v < self.entries.len()).then_some((v, reg))
    }

    /// Guest read of the pending-bit array (read-only: writes are ignored by the bus).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset.saturating_add(i as u64);
            *b = usize::try_from(byte / 8)
                .ok()
                .and_then(|w| self.pba.get(w))
                .map_or(0, |w| (w >> (8 * (byte % 8))) as u8);
        }
    }
}

/// The handle a device raises its MSI-X vectors with. Cloning shares the same state.
#[derive(Clone)]
pub struct MsixInterrupts(Arc<Mutex<Msix>>);

impl MsixInterrupts {
    pub fn new(msix: Msix) -> Self {
        Self(Arc::new(Mutex::new(msix)))
    }

    /// Raises vector `vector` (or leaves it pending while masked).
    pub fn trigger(&self, vector: u16) {
        self.lock().trigger(vector);
    }

    /// The MSI-X state, for the PCI bus's table/PBA/control forwarding.
    pub fn lock(&self) -> MutexGuard<'_, Msix> {
        // Plain data: a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{PciIds, STATUS, STATUS_CAP_LIST};

    #[derive(Default)]
    struct FakeRouter(Mutex<Vec<(u32, MsiMessage)>>);
    impl MsiRouting for FakeRouter {
        fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    const LAYOUT: MsixLayout = MsixLayout {
        vectors: 3,
        table_bar: 0,
        table_offset: 0x1000,
        pba_bar: 0,
        pba_offset: 0x2000,
    };

    fn setup() -> (Msix, Arc<FakeRouter>, Vec<IrqLine>, ConfigSpace) {
        let router = Arc::new(FakeRouter::default());
        let lines: Vec<IrqLine> = (0..3).map(|i| IrqLine::new(24 + i).unwrap()).collect();
        let mut config = ConfigSpace::new(PciIds::default());
        let msix = Msix::new(LAYOUT, lines.clone(), router.clone(), &mut config).unwrap();
        (msix, router, lines, config)
    }

    fn write_entry(m: &mut Msix, v: u64, addr: u64, data: u32, masked: bool) {
        m.write_table(v * 16, &addr.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn pending(m: &Msix) -> u8 {
        let mut b = [0u8; 1];
        m.read_pba(0, &mut b);
        b[0]
    }

    #[test]
    fn capability_describes_the_table_and_pba() {
        let (m, _, _, config) = setup();
        assert_ne!(config.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        let cap = m.control_offset() - 2;
        assert_eq!(config.read_u32(cap), 0x0002_0011, "id, end of list, size 3");
        assert_eq!(config.read_u32(cap + 4), 0x1000);
        assert_eq!(config.read_u32(cap + 8), 0x2000);
        assert_eq!(LAYOUT.pba_size(), 8);
        assert_eq!(LAYOUT.table_size(), 48);
    }

    #[test]
    fn masked_vectors_go_pending_and_fire_on_unmask() {
        let (mut m, router, lines, _) = setup();
        write_entry(&mut m, 1, 0xfee0_0000, 0x41, false);
        m.trigger(1);
        assert_eq!(pending(&m), 0b010, "MSI-X disabled: pending");
        assert!(router.0.lock().unwrap().is_empty());

        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(1);
        assert_eq!(pending(&m), 0b010, "function masked: still pending");
        assert!(lines[1].eventfd().read().is_err(), "nothing delivered yet");

        m.set_control(CONTROL_ENABLE);
        assert_eq!(pending(&m), 0);
        assert_eq!(lines[1].eventfd().read().unwrap(), 1, "fired on unmask");
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(*router.0.lock().unwrap(), [(25, msg)]);

        m.trigger(1);
        assert_eq!(lines[1].eventfd().read().unwrap(), 1, "direct delivery");
        // Vector 0 is still masked by its own control word.
        m.trigger(0);
        assert_eq!(pending(&m), 1);
        write_entry(&mut m, 0, 0xfee0_1000, 0x42, false);
        assert_eq!(lines[0].eventfd().read().unwrap(), 1);
        assert_eq!(router.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn routes_change_only_with_the_message() {
        let (mut m, router, _, _) = setup();
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 2, 0xfee0_0000, 0x30, false);
        write_entry(&mut m, 2, 0xfee0_0000, 0x30, true);
        write_entry(&mut m, 2, 0xfee0_0000, 0x30, false);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(router.0.lock().unwrap().len(), 1);
        // Rewritten while unmasked (the spec leaves it undefined): KVM follows each change.
        write_entry(&mut m, 2, 0x1_fee0_0000, 0x31, false);
        assert_eq!(
            *router.0.lock().unwrap().last().unwrap(),
            (
                26,
                MsiMessage {
                    address: 0x1_fee0_0000,
                    data: 0x31
                }
            )
        );
    }

    #[test]
    fn table_reads_back_and_ignores_bad_accesses() {
        let (mut m, _, _, _) = setup();
        let mut q = [0u8; 8];
        m.read_table(12, &mut q[..4]);
        assert_eq!(q[..4], [1, 0, 0, 0], "vectors start masked");
        write_entry(&mut m, 0, 0x1234_5678_9abc_def3, 7, true);
        m.read_table(0, &mut q);
        assert_eq!(
            u64::from_le_bytes(q),
            0x1234_5678_9abc_def0,
            "low 2 bits read 0"
        );
        m.write_table(2, &[0xff; 4]);
        m.write_table(0, &[0xff; 2]);
        m.write_table(48, &[0xff; 4]);
        m.write_table(u64::MAX - 3, &[0xff; 4]);
        m.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1234_5678_9abc_def0);
        m.read_table(4, &mut q);
        assert_eq!(q, [0; 8], "misaligned 8-byte read");
        m.read_table(u64::MAX - 7, &mut q);
        m.read_pba(u64::MAX, &mut q);
        m.trigger(300);
    }

    #[test]
    fn bad_setups_are_refused() {
        let router: Arc<dyn MsiRouting> = Arc::new(FakeRouter::default());
        let mut config = ConfigSpace::new(PciIds::default());
        let lines = vec![IrqLine::new(30).unwrap()];
        assert!(Msix::new(LAYOUT, lines.clone(), router.clone(), &mut config).is_err());
        let odd = MsixLayout {
            vectors: 1,
            table_offset: 4,
            ..LAYOUT
        };
        assert!(Msix::new(odd, lines, router, &mut config).is_err());
    }
}
