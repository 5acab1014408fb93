//! Global allocator: `linked_list_allocator` over a static (not pre-zeroed) array.

use core::mem::MaybeUninit;
use linked_list_allocator::LockedHeap;

const HEAP_SIZE: usize = 256 * 1024;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

#[unsafe(link_section = ".bss.noinit.heap")]
static mut HEAP: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];

/// Hands the heap array to the allocator. Call once, before any allocation.
pub fn init() {
    // SAFETY: called once on the BSP before anything allocates; nothing else references HEAP.
    unsafe {
        ALLOCATOR
            .lock()
            .init((&raw mut HEAP).cast::<u8>(), HEAP_SIZE);
    }
}
