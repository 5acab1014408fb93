//! Errors from building or installing the tables.

/// Why the ACPI tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need at least one vCPU")]
    NoCpus,
    #[error("{cpus} vCPUs requested, the ACPI tables support at most {max}")]
    TooManyCpus { cpus: u32, max: u32 },
    #[error("RSDP address {0:#x} is not 16-byte aligned")]
    MisalignedRsdp(u64),
    #[error("ACPI tables need [{start:#x}, {needed_end:#x}) but the region ends at {limit:#x}")]
    RegionOverflow {
        start: u64,
        needed_end: u64,
        limit: u64,
    },
    #[error("writing ACPI table {signature} to guest address {addr:#x} failed")]
    GuestMemory {
        signature: String,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}
