//! Descriptor chains as every device walks them: a split queue (virtio-queue) anywhere in guest
//! memory, served the way the devices serve theirs — avail index check, `pop_descriptor_chain`,
//! `collect_chain` — and each chain then read as a virtio-blk request (`Request::parse`), a vsock
//! TX packet (`read_tx`) and filled as a vsock RX buffer (`write_rx`).
//!
//! Checked: nothing panics; every descriptor a walk returns lies in guest memory with the
//! permission its direction needs; what the parsers return stays inside the chain; and the only
//! guest memory written is the used ring and device-writable buffers.

#![no_main]

use std::sync::atomic::Ordering;

use hyperpool_devices::virtio::block::request::{ParseError, RawDesc, Request, total_len};
use hyperpool_devices::virtio::chain::{Desc, collect_chain};
use hyperpool_devices::virtio::vsock::packet::{
    HDR_LEN, Header, MAX_PKT_DATA, op, read_tx, rx_capacity, write_rx,
};
use hyperpool_fuzz::chain_case::ChainCase;
use hyperpool_fuzz::memory::{self, Writable};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

fuzz_target!(|data: &[u8]| {
    let case = ChainCase::decode(data);
    let mem = memory::guest_memory(case.image);
    let mut q = Queue::new(256).expect("queue");
    q.set_size(case.queue_size);
    if q.try_set_desc_table_address(GuestAddress(case.desc))
        .is_err()
        || q.try_set_avail_ring_address(GuestAddress(case.avail))
            .is_err()
        || q.try_set_used_ring_address(GuestAddress(case.used))
            .is_err()
    {
        return;
    }
    q.set_event_idx(case.event_idx);
    q.set_ready(true);
    // The transport refuses rings outside memory before a device sees them.
    if !q.is_valid(&mem) {
        return;
    }
    q.set_next_avail(case.next_avail);
    q.set_next_used(case.next_used);

    let before = memory::snapshot(&mem);
    let mut writable = Writable::default();
    // flags, idx, ring[size], avail_event.
    writable.allow(case.used, 6 + 8 * u64::from(case.queue_size));
    serve(&mut q, &mem, &mut writable);
    writable.check(&before, &memory::snapshot(&mem));
});

fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64, perm: Permissions) -> bool {
    len == 0 || GuestMemory::check_range(mem, addr, len as usize, perm)
}

/// One pass over the queue, as a device's worker makes it.
fn serve(q: &mut Queue, mem: &GuestMemoryMmap, writable: &mut Writable) {
    if q.disable_notification(mem).is_err() {
        return;
    }
    let Ok(avail) = q.avail_idx(mem, Ordering::Acquire) else {
        return;
    };
    if avail.0.wrapping_sub(q.next_avail()) > q.size() {
        return; // AvailIndex: the device needs a reset
    }
    // Our own writes (RX data) may land in the avail ring; never loop forever on that.
    for _ in 0..4 * usize::from(q.size()) {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let Ok(descs) = collect_chain(chain, mem) else {
            return; // BadChain / BadBuffer: the device needs a reset
        };
        let used_len = check_chain(mem, &descs, writable);
        if q.add_used(mem, head, used_len).is_err() {
            return;
        }
    }
    let _ = q.enable_notification(mem);
    let _ = q.needs_notification(mem);
}

/// The checks on one walked chain; returns the bytes "written" for the used ring.
fn check_chain(mem: &GuestMemoryMmap, descs: &[Desc], writable: &mut Writable) -> u32 {
    assert!(!descs.is_empty());
    for d in descs {
        let perm = if d.write_only {
            Permissions::Write
        } else {
            Permissions::Read
        };
        assert!(
            in_memory(mem, d.addr, d.len.into(), perm),
            "collect_chain returned {d:?} outside guest memory"
        );
        if d.write_only {
            writable.allow(d.addr.0, d.len.into());
        }
    }
    let chain_len: u64 = descs.iter().map(|d| u64::from(d.len)).sum();

    // virtio-blk.
    let raw: Vec<RawDesc> = descs
        .iter()
        .map(|d| RawDesc {
            addr: d.addr.0,
            len: d.len,
            write: d.write_only,
        })
        .collect();
    let status_ok = |s: GuestAddress| in_memory(mem, s, 1, Permissions::Write);
    match Request::parse(mem, &raw) {
        Ok(req) => {
            assert!(status_ok(req.status), "status byte outside memory");
            for s in &req.readable {
                assert!(in_memory(mem, s.addr, s.len, Permissions::Read));
            }
            for s in &req.writable {
                assert!(in_memory(mem, s.addr, s.len, Permissions::Write));
            }
            let parts = total_len(&req.readable) + 16 + total_len(&req.writable) + 1;
            assert!(parts <= chain_len, "request larger than its chain");
        }
        Err(ParseError::Invalid { status, .. }) => assert!(status_ok(status)),
        Err(ParseError::Broken(why)) => {
            // The walk already checked every buffer: only a missing status byte is left.
            let last = descs[descs.len() - 1];
            assert!(
                !(last.write_only && last.len > 0),
                "Request::parse broke a chain collect_chain accepted: {why}"
            );
        }
    }

    // virtio-vsock TX.
    let tx = read_tx(mem, descs).expect("read_tx on a walked chain never breaks the queue");
    if let Ok((hdr, payload)) = tx {
        assert_eq!(payload.len(), hdr.len as usize);
        assert!(hdr.len <= MAX_PKT_DATA);
        assert!(HDR_LEN as u64 + u64::from(hdr.len) <= chain_len);
        assert_eq!(Header::from_bytes(&hdr.to_bytes()), hdr);
    }

    // virtio-vsock RX: a header and as much payload as fits.
    let cap = rx_capacity(descs);
    if cap < HDR_LEN as u64 {
        return 0;
    }
    let room = (cap - HDR_LEN as u64).min(u64::from(MAX_PKT_DATA)) as usize;
    let payload = vec![0x5a; room.min(4096)];
    let hdr = Header {
        src_cid: 2,
        dst_cid: 3,
        len: payload.len() as u32,
        type_: 1,
        op: op::RW,
        ..Default::default()
    };
    let written = write_rx(mem, descs, &hdr, &payload).expect("write_rx on a walked chain");
    assert_eq!(u64::from(written), HDR_LEN as u64 + payload.len() as u64);
    written
}
