//! Writes the seed inputs in `fuzz/seeds/<target>/`: well-formed cases (a driver's ordinary
//! requests, a qemu-img image) for the fuzzer to start from. The seeds are checked in; run this
//! after changing an input layout: `cargo run --example gen_seeds` in `fuzz/` (the qcow2 seeds
//! need qemu-img and qemu-io).

use std::path::{Path, PathBuf};
use std::process::Command;

use hyperpool_fuzz::chain_case::ChainCase;
use hyperpool_fuzz::device_case::{
    DeviceCase, Image, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use hyperpool_fuzz::pci_case::{Op, kind};
use hyperpool_fuzz::qcow2_case::{Qcow2Case, Req, kind as qkind};

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

fn save(target: &str, name: &str, bytes: &[u8]) {
    let dir = seeds_dir().join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// `struct virtio_blk_outhdr`: type, reserved, sector.
fn blk_header(t: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// `struct virtio_vsock_hdr`.
fn vsock_header(dst_port: u32, src_port: u32, len: u32, op: u16, flags: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[..8].copy_from_slice(&3u64.to_le_bytes()); // guest CID
    h[8..16].copy_from_slice(&2u64.to_le_bytes()); // host CID
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[32..36].copy_from_slice(&flags.to_le_bytes());
    h[36..40].copy_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    h
}

fn chain_seeds() {
    let (desc, avail, used) = hyperpool_fuzz::rig::rings(0);
    let case = |image: &[u8], size: u16, event_idx: bool, next: u16| {
        ChainCase {
            queue_size: size,
            event_idx,
            desc,
            avail,
            used,
            next_avail: next,
            next_used: next,
            image,
        }
        .encode()
    };
    // A blk IN request: header, data, status.
    let mut img = Image::default();
    img.chain(
        0,
        0,
        &[(0x200, 16, false), (0x9000, 512, true), (0x300, 1, true)],
    )
    .avail(0, &[0])
    .put(0x200, &blk_header(0, 8));
    save("virtio_chain", "blk-in", &case(&img.0, 16, false, 0));
    // A vsock TX packet split over two descriptors, and an RX buffer.
    let mut img = Image::default();
    img.chain(0, 0, &[(0x200, 44, false), (0x300, 5, false)])
        .chain(0, 2, &[(0x9000, 4096, true)])
        .avail(0, &[0, 2])
        .put(0x200, &vsock_header(1234, 5000, 5, 5, 0))
        .put(0x300, b"hello");
    save("virtio_chain", "vsock-tx-rx", &case(&img.0, 16, true, 0));
    // An indirect table of three descriptors.
    let mut img = Image::default();
    img.desc(0, 0, (0x100, 48, VRING_DESC_F_INDIRECT, 0))
        .avail(0, &[0])
        .put(0x200, &blk_header(1, 0));
    // A blk OUT: header and data device-readable, then the status byte.
    let table = [
        (0x200u64, 16u32, VRING_DESC_F_NEXT, 1u16),
        (0x400, 1024, VRING_DESC_F_NEXT, 2),
        (0x300, 1, VRING_DESC_F_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in table.into_iter().enumerate() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        img.put(0x100 + 16 * i as u64, &b);
    }
    save("virtio_chain", "indirect", &case(&img.0, 8, false, 0));
    // Indices about to wrap, in a queue of 4.
    let mut img = Image::default();
    img.chain(0, 0, &[(0x200, 16, false), (0x300, 1, true)])
        .chain(0, 2, &[(0x200, 16, false), (0x301, 1, true)])
        .put(0x200, &blk_header(4, 0))
        .put(avail, &[0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0]);
    save("virtio_chain", "wrap", &case(&img.0, 4, true, 0xfffe));
}

/// A virtio-blk request: type, sector, and its data buffer `(length, device-writable)` if any.
type BlkReq = (u32, u64, Option<(u32, bool)>);

fn blk_image(queue: usize) -> Vec<u8> {
    let mut img = Image::default();
    // Queues of 32 use 0x200 bytes of their descriptor table; the rest holds the requests.
    let base = hyperpool_fuzz::rig::rings(queue).0;
    let hdr = |i: u64| base + 0x200 + 0x20 * i;
    let status = |i: u64| base + 0x300 + i;
    let data = |i: u64| base + 0x400 + 0x200 * i;
    let reqs: [BlkReq; 6] = [
        (1, 1, Some((512, false))), // OUT
        (0, 1, Some((512, true))),  // IN
        (4, 0, None),               // FLUSH
        (8, 0, Some((20, true))),   // GET_ID
        (11, 0, Some((16, false))), // DISCARD
        (13, 0, Some((16, false))), // WRITE_ZEROES
    ];
    let mut heads = Vec::new();
    let mut next = 0u16;
    for (i, (t, sector, buf)) in reqs.into_iter().enumerate() {
        let i = i as u64;
        img.put(hdr(i), &blk_header(t, sector));
        let mut bufs = vec![(hdr(i), 16, false)];
        if let Some((len, write)) = buf {
            // What the device writes may lie past the input (zeroed memory).
            let at = if write { 0x9000 + 0x200 * i } else { data(i) };
            bufs.push((at, len, write));
        }
        bufs.push((status(i), 1, true));
        heads.push(next);
        img.chain(queue, next, &bufs);
        next += bufs.len() as u16;
    }
    // DISCARD sector 2, WRITE_ZEROES sectors 4..6 with unmap.
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    };
    img.put(data(4), &seg(2, 1, 0))
        .put(data(5), &seg(4, 2, 1))
        .put(data(0), &[0xa5; 512])
        .avail(queue, &heads);
    img.0
}

fn blk_seeds() {
    for (name, readonly, queues, queue) in [
        ("rw", 0u8, 1u8, 0usize),
        ("readonly", 1, 1, 0),
        ("second-queue", 0, 2, 1),
    ] {
        let image = blk_image(queue);
        let case = DeviceCase {
            queue_size: 32,
            kick: 0xff,
            features: u64::MAX,
            extra: [readonly, queues - 1, 15, 0, 0, 0],
            image: &image,
        };
        save("virtio_blk", name, &case.encode());
    }
}

fn net_seeds() {
    let mut img = Image::default();
    // TX (slot 0): a plain frame in one buffer; a TSO frame with the header on its own.
    let mut plain = vec![0u8; 12];
    plain.extend_from_slice(&[0xff; 6]);
    plain.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00]);
    plain.resize(12 + 60, 0x11);
    let mut tso = [0u8; 12];
    tso[0] = 1; // NEEDS_CSUM
    tso[1] = 1; // GSO_TCPV4
    tso[2..4].copy_from_slice(&54u16.to_le_bytes());
    tso[4..6].copy_from_slice(&1448u16.to_le_bytes());
    tso[6..8].copy_from_slice(&34u16.to_le_bytes());
    tso[8..10].copy_from_slice(&16u16.to_le_bytes());
    img.put(0x200, &plain)
        .put(0x300, &tso)
        .chain(0, 0, &[(0x200, plain.len() as u32, false)])
        .chain(0, 1, &[(0x300, 12, false), (0x9000, 3000, false)])
        .avail(0, &[0, 1])
        // RX (slot 1): two buffers.
        .chain(1, 0, &[(0xa000, 2048, true)])
        .chain(1, 1, &[(0xa800, 12, true), (0xb000, 2036, true)])
        .avail(1, &[0, 1]);
    let case = DeviceCase {
        queue_size: 16,
        kick: 0b11,
        features: u64::MAX,
        extra: [2, 100, 0, 0, 0, 0],
        image: &img.0,
    };
    save("virtio_net", "tx-rx", &case.encode());
    let case = DeviceCase {
        features: 0,
        ..case
    };
    save("virtio_net", "no-offloads", &case.encode());
}

fn vsock_seeds() {
    const PORT: u32 = 1234;
    let guest_port = 5000;
    let rx = |img: &mut Image| {
        for i in 0..4u16 {
            img.chain(1, i, &[(0x9000 + 0x1000 * u64::from(i), 0x1000, true)]);
        }
        img.avail(1, &[0, 1, 2, 3]);
    };
    // The guest connects to the host's PATH_1234, sends, asks for credit, stops receiving.
    let mut img = Image::default();
    let pkts: [(u16, u32, &[u8]); 4] = [
        (1, 0, b""),        // REQUEST
        (5, 0, b"hello\n"), // RW
        (7, 0, b""),        // CREDIT_REQUEST
        (4, 1, b""),        // SHUTDOWN (receive)
    ];
    let mut heads = Vec::new();
    for (i, (op, flags, payload)) in pkts.into_iter().enumerate() {
        let at = 0x100 + 0x40 * i as u64;
        let hdr = vsock_header(PORT, guest_port, payload.len() as u32, op, flags);
        img.put(at, &hdr).put(at + 44, payload);
        img.chain(0, i as u16, &[(at, 44 + payload.len() as u32, false)]);
        heads.push(i as u16);
    }
    img.avail(0, &heads);
    rx(&mut img);
    let case = DeviceCase {
        queue_size: 16,
        kick: 0b111,
        features: u64::MAX,
        extra: [0xd2, 0x04, 0, 0, 1, 0], // port 1234, host listener
        image: &img.0,
    };
    save("virtio_vsock", "guest-connects", &case.encode());
    // A host program asked for guest port 1234: the guest accepts (RESPONSE to the first local
    // port the muxer hands out) and sends data.
    let mut img = Image::default();
    let local = 1u32 << 30;
    let mut resp = vsock_header(local, PORT, 0, 2, 0);
    resp[16..20].copy_from_slice(&PORT.to_le_bytes());
    let mut data = vsock_header(local, PORT, 3, 5, 0);
    data[16..20].copy_from_slice(&PORT.to_le_bytes());
    img.put(0x100, &resp)
        .put(0x140, &data)
        .put(0x140 + 44, b"abc")
        .chain(0, 0, &[(0x100, 44, false)])
        .chain(0, 1, &[(0x140, 47, false)])
        .avail(0, &[0, 1]);
    rx(&mut img);
    let case = DeviceCase {
        extra: [0xd2, 0x04, 0, 0, 2, 0], // port 1234, host client
        image: &img.0,
        ..case
    };
    save("virtio_vsock", "host-connects", &case.encode());
}

fn pci_seeds() {
    let op = |kind: u8, len: usize, slot: u8, bar: u8, read: bool, offset: u32, value: u64| {
        Op {
            kind,
            len_code: Op::code(len),
            slot,
            bar,
            read,
            wide: false,
            offset,
            value,
        }
        .encode()
    };
    let mut ops = Vec::new();
    // Enumerate: ids, BAR sizing, memory decoding on.
    for slot in 0..4 {
        ops.push(op(kind::ECAM, 4, slot, 0, true, 0, 0));
        for bar in 0..6 {
            ops.push(op(kind::BAR_PROBE, 4, slot, bar, false, 0, 0));
        }
        ops.push(op(kind::COMMAND, 2, slot, 0, false, 0, 0x6));
    }
    // MSI-X: vector 0 unmasked, then enable (capability at 0x40, control at 0x42).
    ops.push(op(kind::BAR, 4, 1, 2, false, 0, 0xfee0_0000));
    ops.push(op(kind::BAR, 4, 1, 2, false, 8, 0x41));
    ops.push(op(kind::BAR, 4, 1, 2, false, 12, 0));
    ops.push(op(kind::ECAM, 2, 1, 0, false, 0x42, 0x8000));
    // The virtio driver's bring-up through BAR 0.
    let common = |ops: &mut Vec<[u8; 16]>, len: usize, off: u32, v: u64| {
        ops.push(op(kind::BAR, len, 1, 0, false, off, v));
    };
    common(&mut ops, 1, 0x14, 1);
    common(&mut ops, 1, 0x14, 3);
    common(&mut ops, 4, 0x08, 1);
    common(&mut ops, 4, 0x0c, 1); // VERSION_1
    common(&mut ops, 1, 0x14, 0xb);
    common(&mut ops, 2, 0x16, 0);
    common(&mut ops, 2, 0x18, 16);
    common(&mut ops, 8, 0x20, 0x1000);
    common(&mut ops, 8, 0x28, 0x2000);
    common(&mut ops, 8, 0x30, 0x3000);
    common(&mut ops, 2, 0x1a, 0);
    common(&mut ops, 2, 0x1c, 1);
    common(&mut ops, 1, 0x14, 0xf);
    common(&mut ops, 2, 0x3000, 0); // notify queue 0
    ops.push(op(kind::BAR, 1, 1, 0, true, 0x1000, 0)); // ISR
    ops.push(op(kind::BAR, 4, 1, 0, true, 0x2000, 0)); // device config
    ops.push(op(kind::BAR, 8, 1, 2, true, 0x30, 0)); // PBA
    save("pci_config", "enumerate-and-drive", &ops.concat());

    // Moving the 64-bit BAR of slot 2 and the virtio BAR, through 0xCF8/0xCFC and ECAM.
    let mut ops = vec![
        op(kind::COMMAND, 2, 2, 0, false, 0, 0x2),
        op(kind::CF8, 4, 0, 0, false, 0, 0x8000_1010),
        op(kind::CFC, 4, 0, 0, false, 0, 0x4000_0000),
        op(kind::CF8, 4, 0, 0, false, 0, 0x8000_1014),
        op(kind::CFC, 4, 0, 0, false, 0, 0x20),
        op(kind::CFC, 2, 0, 0, true, 2, 0),
        op(kind::ECAM, 4, 1, 0, false, 0x10, 0xd000_0000),
        op(kind::COMMAND, 2, 1, 0, false, 0, 0x2),
        op(kind::BAR, 4, 2, 0, true, 0x80, 0),
        op(kind::VIRTIO, 2, 1, 0, false, 0x16, 1),
        op(kind::VIRTIO, 2, 1, 0, true, 0x18, 0),
    ];
    let mut w = op(kind::WINDOW, 4, 0, 0, true, 0, 0);
    w[3] |= 2; // the 64-bit window
    ops.push(w);
    save("pci_config", "move-bars", &ops.concat());
}

fn qcow2_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let run = |cmd: &str, args: &[&str]| -> bool {
        Command::new(cmd)
            .args(args)
            .current_dir(dir.path())
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !run("qemu-img", &["--version"]) {
        eprintln!("qemu-img not found: qcow2 seeds not written");
        return;
    }
    let reqs = vec![
        Req {
            kind: qkind::WRITE,
            sectors: 8,
            fill: 0xab,
            sector: 0,
        },
        Req {
            kind: qkind::READ,
            sectors: 16,
            fill: 0,
            sector: 0,
        },
        Req {
            kind: qkind::WRITE_ZEROES,
            sectors: 2,
            fill: 0,
            sector: 4,
        },
        Req {
            kind: qkind::WRITE_ZEROES_UNMAP,
            sectors: 2,
            fill: 0,
            sector: 40,
        },
        Req {
            kind: qkind::DISCARD,
            sectors: 8,
            fill: 0,
            sector: 0,
        },
        Req {
            kind: qkind::FLUSH,
            sectors: 0,
            fill: 0,
            sector: 0,
        },
    ];
    let images: [(&str, &[&str], bool); 4] = [
        ("v3-512", &["-o", "cluster_size=512"], false),
        ("v2-512", &["-o", "cluster_size=512,compat=0.10"], false),
        ("v3-4k-data", &["-o", "cluster_size=4096"], true),
        (
            "v3-512-lazy",
            &["-o", "cluster_size=512,lazy_refcounts=on"],
            true,
        ),
    ];
    for (name, opts, data) in images {
        let file = format!("{name}.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[file.as_str(), "64K"]);
        assert!(run("qemu-img", &args), "qemu-img create {name}");
        if data {
            let w = "write -P 0x5c 512 3k";
            assert!(
                run("qemu-io", &["-f", "qcow2", "-c", w, &file]),
                "qemu-io {name}"
            );
        }
        let image = std::fs::read(dir.path().join(&file)).unwrap();
        for (flags, suffix) in [(0u8, ""), (1, "-ro")] {
            let case = Qcow2Case {
                readonly: flags & 1 != 0,
                explicit_format: false,
                reqs: reqs.clone(),
                image: &image,
            };
            save("qcow2_image", &format!("{name}{suffix}"), &case.encode());
        }
    }
}

fn main() {
    chain_seeds();
    blk_seeds();
    net_seeds();
    vsock_seeds();
    pci_seeds();
    qcow2_seeds();
    println!("seeds written to {}", seeds_dir().display());
}
