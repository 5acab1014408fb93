//! The frontend's guest memory as the backend maps it: every region arrives as a file
//! descriptor (SET_MEM_TABLE, ADD_MEM_REG) and is mapped shared, so the device reads and writes
//! the guest's own pages. Ring addresses arrive as the frontend's virtual addresses, so each
//! region also remembers where the frontend has it mapped.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The most regions a frontend may give (QEMU's limit for CONFIGURE_MEM_SLOTS is 509; a VM has
/// a handful).
pub const MAX_REGIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("region {gpa:#x}+{size:#x} at file offset {offset:#x}: {why}")]
    Region {
        gpa: u64,
        size: u64,
        offset: u64,
        why: String,
    },
    #[error("more than {MAX_REGIONS} memory regions")]
    TooMany,
    #[error("regions overlap or are unusable: {0}")]
    Layout(String),
    #[error("no region at guest address {0:#x}")]
    NotFound(u64),
}

/// What the frontend says about one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    pub gpa: u64,
    pub size: u64,
    /// Where the frontend has the region mapped (its virtual address).
    pub user_addr: u64,
    /// Where the region starts in the file descriptor.
    pub offset: u64,
}

struct Mapped {
    spec: RegionSpec,
    region: Arc<GuestRegionMmap>,
}

/// The mapped regions, sorted by guest address.
#[derive(Default)]
pub struct MemoryTable {
    regions: Vec<Mapped>,
}

impl MemoryTable {
    /// Replaces every region (SET_MEM_TABLE). On error the table is unchanged.
    pub fn replace(&mut self, specs: &[RegionSpec], files: Vec<File>) -> Result<(), MemoryError> {
        if specs.len() > MAX_REGIONS {
            return Err(MemoryError::TooMany);
        }
        let mut new = Vec::with_capacity(specs.len());
        for (spec, file) in specs.iter().zip(files) {
            new.push(map(*spec, file)?);
        }
        check_layout(&mut new)?;
        self.regions = new;
        Ok(())
    }

    /// Adds one region (ADD_MEM_REG).
    pub fn add(&mut self, spec: RegionSpec, file: File) -> Result<(), MemoryError> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(MemoryError::TooMany);
        }
        let mut new: Vec<Mapped> = self
            .regions
            .iter()
            .map(|m| Mapped {
                spec: m.spec,
                region: m.region.clone(),
            })
            .collect();
        new.push(map(spec, file)?);
        check_layout(&mut new)?;
        self.regions = new;
        Ok(())
    }

    /// Removes the region at `gpa` of `size` bytes (REM_MEM_REG).
    pub fn remove(&mut self, gpa: u64, size: u64) -> Result<(), MemoryError> {
        let at = self
            .regions
            .iter()
            .position(|m| m.spec.gpa == gpa && m.spec.size == size)
            .ok_or(MemoryError::NotFound(gpa))?;
        self.regions.remove(at);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The guest memory the devices use (empty while no region is mapped).
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        if self.regions.is_empty() {
            return GuestMemoryMmap::new();
        }
        // The layout was checked when the regions were added.
        GuestMemoryMmap::from_arc_regions(self.regions.iter().map(|m| m.region.clone()).collect())
            .unwrap_or_default()
    }

    /// The guest address of the frontend's virtual address `va`, if a region holds it.
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions.iter().find_map(|m| {
            let delta = va.checked_sub(m.spec.user_addr)?;
            (delta < m.spec.size).then(|| m.spec.gpa + delta)
        })
    }
}

fn map(spec: RegionSpec, file: File) -> Result<Mapped, MemoryError> {
    let bad = |why: String| MemoryError::Region {
        gpa: spec.gpa,
        size: spec.size,
        offset: spec.offset,
        why,
    };
    let meta = file.metadata().map_err(|e| bad(format!("fstat: {e}")))?;
    let ft = meta.file_type();
    // Only files whose size is known: a mapping past a file's end faults (SIGBUS) on access.
    if !ft.is_file() && !ft.is_block_device() {
        return Err(bad("not a regular file (memfd, hugetlbfs or tmpfs)".into()));
    }
    let size = usize::try_from(spec.size).map_err(|_| bad("too large".into()))?;
    // SAFETY: sysconf has no side effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    if spec.size == 0 || spec.offset % page != 0 {
        return Err(bad("empty, or the offset is not page aligned".into()));
    }
    let end = spec.offset.checked_add(spec.size);
    if ft.is_file() && end.is_none_or(|end| end > meta.len()) {
        return Err(bad(format!("the file has only {:#x} bytes", meta.len())));
    }
    if spec.gpa.checked_add(spec.size).is_none() || spec.user_addr.checked_add(spec.size).is_none()
    {
        return Err(bad("address range wraps".into()));
    }
    let mapping = MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(file, spec.offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| bad(format!("mmap: {e}")))?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(spec.gpa))
        .ok_or_else(|| bad("guest range wraps".into()))?;
    Ok(Mapped {
        spec,
        region: Arc::new(region),
    })
}

/// Sorts by guest address; guest ranges must not overlap (vm-memory checks), and neither may
/// the frontend's virtual ranges (a ring address must translate to one guest address).
fn check_layout(regions: &mut [Mapped]) -> Result<(), MemoryError> {
    regions.sort_by_key(|m| m.spec.gpa);
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let (x, y) = (a.spec, b.spec);
            if x.gpa < y.gpa + y.size && y.gpa < x.gpa + x.size {
                return Err(MemoryError::Layout(format!(
                    "guest ranges {:#x} and {:#x} overlap",
                    x.gpa, y.gpa
                )));
            }
            if x.user_addr < y.user_addr + y.size && y.user_addr < x.user_addr + x.size {
                return Err(MemoryError::Layout(format!(
                    "frontend addresses {:#x} and {:#x} overlap",
                    x.user_addr, y.user_addr
                )));
            }
        }
    }
    if !regions.is_empty() {
        GuestMemoryMmap::from_arc_regions(regions.iter().map(|m| m.region.clone()).collect())
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
    }
    Ok(())
}
