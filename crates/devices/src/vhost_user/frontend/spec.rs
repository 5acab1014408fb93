//! What a vhost-user device is (disk or network card, its socket and queues), and the pure
//! decisions made from what the backend offers: which feature bits the guest may see, and the
//! device configuration space it reads.

use std::path::PathBuf;

use crate::virtio::features;

/// The kind of device a backend serves, with what the VMM decides for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// virtio-blk: capacity, block size, read-only are the backend's.
    Block,
    /// virtio-net: the MAC is the VMM's.
    Net { mac: [u8; 6] },
}

/// A vhost-user device as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub kind: Kind,
    /// The backend's listening socket.
    pub socket: PathBuf,
    /// Virtqueues the guest gets (net: RX + TX per pair).
    pub num_queues: u16,
    /// Each queue's maximum size (a power of two, at most [`crate::virtio::MAX_QUEUE_SIZE`]).
    pub queue_size: u16,
}

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit in the virtio feature word, never the
/// guest's.
pub const PROTOCOL_FEATURES: u64 = 1 << 30;

/// virtio-blk's configuration space as this VMM serves it (up to the write-zeroes fields).
pub const BLOCK_CONFIG_LEN: usize = 60;
/// virtio-blk `num_queues` (u16) in the configuration space.
const BLOCK_NUM_QUEUES_OFFSET: usize = 34;
const BLOCK_F_MQ: u64 = 1 << 12;

/// virtio-net's configuration space: mac, status, max_virtqueue_pairs.
pub const NET_CONFIG_LEN: usize = 10;
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;
const NET_F_MQ: u64 = 1 << 22;
const NET_S_LINK_UP: u16 = 1;
/// The net bits a vhost-user backend may pass to the guest: offloads and buffers, which the
/// backend implements on its rings. Not the control queue (CTRL_VQ and what depends on it): the
/// VMM would have to serve it, and it does not.
const NET_PASSED: u64 = (1 << 0) // CSUM
    | (1 << 1) // GUEST_CSUM
    | (1 << 7) // GUEST_TSO4
    | (1 << 8) // GUEST_TSO6
    | (1 << 9) // GUEST_ECN
    | (1 << 10) // GUEST_UFO
    | (1 << 11) // HOST_TSO4
    | (1 << 12) // HOST_TSO6
    | (1 << 13) // HOST_ECN
    | (1 << 14) // HOST_UFO
    | (1 << 15) // MRG_RXBUF
    | NET_F_STATUS;

impl Spec {
    pub fn device_type(&self) -> u32 {
        match self.kind {
            Kind::Block => virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK,
            Kind::Net { .. } => virtio_bindings::virtio_ids::VIRTIO_ID_NET,
        }
    }

    pub fn config_len(&self) -> usize {
        match self.kind {
            Kind::Block => BLOCK_CONFIG_LEN,
            Kind::Net { .. } => NET_CONFIG_LEN,
        }
    }

    /// The feature bits the guest is offered: what the backend offers and this transport and
    /// device kind can carry. Ring layouts we do not carry (packed, notification data, an
    /// IOMMU) never reach the guest even when the backend has them.
    pub fn offered_features(&self, backend: u64) -> u64 {
        let transport = features::BASE;
        match self.kind {
            // Device bits 0-23 are virtio-blk's own; the backend implements all it offers.
            Kind::Block => backend & (transport | ((1 << 24) - 1)),
            Kind::Net { .. } => {
                let mq = if self.num_queues > 2 { NET_F_MQ } else { 0 };
                // The MAC is ours to give, whether the backend offers the bit or not.
                (backend & (transport | NET_PASSED | mq)) | NET_F_MAC
            }
        }
    }

    /// The feature word for SET_FEATURES: what the driver accepted that the backend offered,
    /// plus the protocol-features bit when the backend has it.
    pub fn backend_features(acked: u64, backend: u64) -> u64 {
        (acked & backend & !PROTOCOL_FEATURES) | (backend & PROTOCOL_FEATURES)
    }

    /// The configuration space the guest reads, from the backend's (`None` if the backend does
    /// not serve one) and what this VMM decides: a disk's queue count, a card's MAC and pairs.
    pub fn guest_config(&self, backend: Option<&[u8]>, offered: u64) -> Result<Vec<u8>, String> {
        let mut cfg = vec![0u8; self.config_len()];
        match (self.kind, backend) {
            (Kind::Block, None) => {
                return Err(
                    "the backend does not serve the configuration space (vhost-user protocol feature CONFIG), which holds the disk's capacity"
                        .into(),
                );
            }
            (Kind::Block, Some(b)) => {
                let n = b.len().min(cfg.len());
                cfg[..n].copy_from_slice(&b[..n]);
                if offered & BLOCK_F_MQ != 0 {
                    cfg[BLOCK_NUM_QUEUES_OFFSET..BLOCK_NUM_QUEUES_OFFSET + 2]
                        .copy_from_slice(&self.num_queues.to_le_bytes());
                }
            }
            (Kind::Net { mac }, b) => {
                if let Some(b) = b {
                    let n = b.len().min(cfg.len());
                    cfg[..n].copy_from_slice(&b[..n]);
                } else if offered & NET_F_STATUS != 0 {
                    cfg[6..8].copy_from_slice(&NET_S_LINK_UP.to_le_bytes());
                }
                cfg[..6].copy_from_slice(&mac);
                cfg[8..10].copy_from_slice(&(self.num_queues / 2).to_le_bytes());
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: Kind, num_queues: u16) -> Spec {
        Spec {
            kind,
            socket: "/s".into(),
            num_queues,
            queue_size: 128,
        }
    }

    const PACKED: u64 = 1 << 34;
    const IOMMU: u64 = 1 << 33;
    const CTRL_VQ: u64 = 1 << 17;

    #[test]
    fn block_features_pass_device_bits_and_drop_what_the_transport_cannot_carry() {
        let s = spec(Kind::Block, 1);
        let ro = 1 << 5;
        let backend = features::BASE | ro | BLOCK_F_MQ | PROTOCOL_FEATURES | PACKED | IOMMU;
        let offered = s.offered_features(backend);
        assert_eq!(offered, features::BASE | ro | BLOCK_F_MQ);
        assert_eq!(
            s.offered_features(features::VERSION_1),
            features::VERSION_1,
            "nothing the backend lacks"
        );
    }

    #[test]
    fn net_features_always_carry_a_mac_and_never_the_control_queue() {
        let backend = features::BASE | CTRL_VQ | NET_F_MQ | NET_F_STATUS | PROTOCOL_FEATURES;
        let one_pair = spec(Kind::Net { mac: [2; 6] }, 2).offered_features(backend);
        assert_eq!(one_pair, features::BASE | NET_F_STATUS | NET_F_MAC);
        let two_pairs = spec(Kind::Net { mac: [2; 6] }, 4).offered_features(backend);
        assert_eq!(two_pairs & NET_F_MQ, NET_F_MQ);
        assert_eq!(two_pairs & CTRL_VQ, 0);
    }

    #[test]
    fn set_features_keeps_the_protocol_bit_and_only_offered_bits() {
        let backend = features::VERSION_1 | PROTOCOL_FEATURES;
        // The driver acked MAC, which we offered on our own: not the backend's business.
        let acked = features::VERSION_1 | NET_F_MAC;
        assert_eq!(
            Spec::backend_features(acked, backend),
            features::VERSION_1 | PROTOCOL_FEATURES
        );
        assert_eq!(
            Spec::backend_features(acked, features::VERSION_1),
            features::VERSION_1
        );
    }

    #[test]
    fn block_config_comes_from_the_backend_with_our_queue_count() {
        let s = spec(Kind::Block, 2);
        assert!(s.guest_config(None, 0).unwrap_err().contains("CONFIG"));
        let mut backend = vec![0u8; BLOCK_CONFIG_LEN];
        backend[..8].copy_from_slice(&2048u64.to_le_bytes());
        backend[34] = 8;
        let cfg = s.guest_config(Some(&backend), BLOCK_F_MQ).unwrap();
        assert_eq!(&cfg[..8], &2048u64.to_le_bytes(), "capacity");
        assert_eq!(&cfg[34..36], &2u16.to_le_bytes(), "num_queues is ours");
        let cfg = s.guest_config(Some(&backend[..20]), 0).unwrap();
        assert_eq!(cfg.len(), BLOCK_CONFIG_LEN, "a short answer is padded");
        assert_eq!(cfg[34], 0);
    }

    #[test]
    fn net_config_has_our_mac_and_pairs() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let s = spec(Kind::Net { mac }, 4);
        let cfg = s.guest_config(None, NET_F_STATUS).unwrap();
        assert_eq!(&cfg[..6], &mac);
        assert_eq!(&cfg[6..8], &1u16.to_le_bytes(), "link up");
        assert_eq!(&cfg[8..10], &2u16.to_le_bytes(), "two pairs");
        let backend = [0xffu8; NET_CONFIG_LEN];
        let cfg = s.guest_config(Some(&backend), 0).unwrap();
        assert_eq!(&cfg[..6], &mac, "the backend's MAC is overridden");
        assert_eq!(&cfg[6..8], &[0xff, 0xff], "its status is kept");
    }
}
