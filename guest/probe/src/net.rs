//! The `net` check, with `virtio-drivers`' `VirtIONet` as the driver: as 10.77.0.2/24 (with the
//! MAC from the device's configuration) it answers ARP requests for itself, resolves 10.77.0.1,
//! sends the UDP datagram `hyperpool-probe` to 10.77.0.1 port 7 and expects it echoed back
//! within 2 s. Ethernet, ARP, IPv4 and UDP are built and parsed by hand.
//!
//! Everything polls in ring 0 and stays small: 16 receive buffers, a handful of frames.

use crate::virtio::{self, ProbeHal};
use crate::{println, time};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::pci::PciTransport;

/// Modern (virtio 1.x) virtio-net PCI device id (0x1040 + 1).
const NET_MODERN: u16 = 0x1041;
const QUEUE_SIZE: usize = 16;
const BUF_LEN: usize = 2048;
const OUR_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const ECHO_PORT: u16 = 7;
const LOCAL_PORT: u16 = 49152;
const MESSAGE: &[u8] = b"hyperpool-probe";
const TIMEOUT_US: u64 = 2_000_000;
/// ARP requests and the datagram are sent again this often until answered.
const RETRY_US: u64 = 250_000;
const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const BROADCAST: [u8; 6] = [0xff; 6];

type Net = VirtIONet<ProbeHal, PciTransport, QUEUE_SIZE>;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac_str(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

fn eth_header(dst: &[u8; 6], src: &[u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An ARP request (op 1) or reply (op 2) from us.
fn arp(op: u16, ours: &[u8; 6], dst_mac: &[u8; 6], dst_ip: &[u8; 4]) -> Vec<u8> {
    let eth_dst = if op == 1 { &BROADCAST } else { dst_mac };
    let mut f = eth_header(eth_dst, ours, ETH_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]); // Ethernet, IPv4, lengths
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(ours);
    f.extend_from_slice(&OUR_IP);
    f.extend_from_slice(if op == 1 { &[0; 6] } else { dst_mac });
    f.extend_from_slice(dst_ip);
    f
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP datagram (checksum 0: optional over IPv4) in an IPv4 packet in a frame.
fn udp(ours: &[u8; 6], host: &[u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = eth_header(host, ours, ETH_IPV4);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x4850u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&OUR_IP);
    ip[16..20].copy_from_slice(&HOST_IP);
    let sum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&LOCAL_PORT.to_be_bytes());
    f.extend_from_slice(&ECHO_PORT.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// What a received frame means to us.
enum Rx {
    /// Someone asks who has 10.77.0.2: answer them.
    ArpRequest {
        mac: [u8; 6],
        ip: [u8; 4],
    },
    /// 10.77.0.1 is at this MAC.
    HostMac([u8; 6]),
    /// A UDP datagram from 10.77.0.1:7 to our port.
    Echo(Vec<u8>),
    Other,
}

fn parse(f: &[u8]) -> Rx {
    if f.len() < 14 {
        return Rx::Other;
    }
    let p = &f[14..];
    match be16(f, 12) {
        ETH_ARP if p.len() >= 28 && be16(p, 0) == 1 && be16(p, 2) == ETH_IPV4 => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&p[8..14]);
            let mut ip = [0u8; 4];
            ip.copy_from_slice(&p[14..18]);
            match be16(p, 6) {
                1 if p[24..28] == OUR_IP => Rx::ArpRequest { mac, ip },
                2 if ip == HOST_IP => Rx::HostMac(mac),
                _ => Rx::Other,
            }
        }
        ETH_IPV4 if p.len() >= 20 && p[0] >> 4 == 4 && p[9] == 17 => {
            let ihl = usize::from(p[0] & 0xf) * 4;
            let total = usize::from(be16(p, 2)).min(p.len());
            if ihl < 20 || total < ihl + 8 || p[12..16] != HOST_IP || p[16..20] != OUR_IP {
                return Rx::Other;
            }
            let u = &p[ihl..total];
            let len = usize::from(be16(u, 4)).min(u.len());
            if be16(u, 0) != ECHO_PORT || be16(u, 2) != LOCAL_PORT || len < 8 {
                return Rx::Other;
            }
            Rx::Echo(u[8..len].to_vec())
        }
        _ => Rx::Other,
    }
}

fn send(net: &mut Net, frame: &[u8]) -> Result<(), String> {
    let mut tx = net.new_tx_buffer(frame.len());
    tx.packet_mut().copy_from_slice(frame);
    net.send(tx).map_err(|e| format!("send: {e}"))
}

/// What the exchange measured.
struct Figures {
    len: usize,
    /// From the first ARP request to the host's answer.
    arp_ticks: u64,
    /// From the last datagram sent to its echo.
    rtt_ticks: u64,
}

/// ARP, then the echo.
fn exchange(net: &mut Net, ours: &[u8; 6]) -> Result<Figures, String> {
    let start = time::rdtsc();
    let deadline = start + time::ticks_for_us(TIMEOUT_US);
    let retry = time::ticks_for_us(RETRY_US);
    let mut host: Option<[u8; 6]> = None;
    let mut next_send = start;
    let (mut arp_ticks, mut sent_at) = (0u64, start);
    let (mut answered, mut frames) = (0u32, 0u32);
    loop {
        let now = time::rdtsc();
        if now > deadline {
            return Err(match host {
                None => format!(
                    "10.77.0.1 not resolved within {} ms ({frames} frames in, {answered} ARP answered)",
                    TIMEOUT_US / 1000
                ),
                Some(_) => format!(
                    "no echo within {} ms ({frames} frames in, {answered} ARP answered)",
                    TIMEOUT_US / 1000
                ),
            });
        }
        if now >= next_send {
            next_send = now + retry;
            match &host {
                None => send(net, &arp(1, ours, &BROADCAST, &HOST_IP))?,
                Some(h) => {
                    sent_at = time::rdtsc();
                    send(net, &udp(ours, h, MESSAGE))?
                }
            }
        }
        let Ok(rx) = net.receive() else {
            core::hint::spin_loop();
            continue;
        };
        frames += 1;
        let what = parse(rx.packet());
        net.recycle_rx_buffer(rx)
            .map_err(|e| format!("recycle: {e}"))?;
        match what {
            Rx::ArpRequest { mac, ip } => {
                send(net, &arp(2, ours, &mac, &ip))?;
                answered += 1;
            }
            Rx::HostMac(mac) if host.is_none() => {
                host = Some(mac);
                next_send = time::rdtsc();
                arp_ticks = next_send - start;
            }
            Rx::Echo(data) => {
                if data != MESSAGE {
                    return Err(format!(
                        "echo was {:?}",
                        String::from_utf8_lossy(&data[..data.len().min(64)])
                    ));
                }
                return Ok(Figures {
                    len: data.len(),
                    arp_ticks,
                    rtt_ticks: time::rdtsc() - sent_at,
                });
            }
            _ => {}
        }
    }
}

/// The `net` check on the first modern virtio-net function of bus 0.
pub fn check(rsdp: u64) -> Result<String, String> {
    let (df, transport) = virtio::open_first(rsdp, NET_MODERN, "net")?;
    let mut net = Net::new(transport, BUF_LEN).map_err(|e| format!("{df} device: {e}"))?;
    let ours: [u8; 6] = net.mac_address();
    let mac = mac_str(&ours);
    // Dropping `net` resets the device before its queues' and buffers' memory is freed.
    let f = exchange(&mut net, &ours).map_err(|e| format!("{df} mac={mac} {e}"))?;
    let per_us = time::ticks_for_us(1000).max(1000) / 1000;
    println!(
        "net: {df} arp_us={} udp_rtt_us={}",
        f.arp_ticks / per_us,
        f.rtt_ticks / per_us
    );
    Ok(format!("mac={mac} echo={}", f.len))
}
