//! What a virtio-blk device did, in Cloud Hypervisor's names (`read_bytes`, `write_bytes`,
//! `read_ops`, `write_ops`) plus the other request types and failures. A request counts once,
//! when it completes: data and ops only if it succeeded, `errors` if it got IOERR (including
//! requests refused before any I/O). Unsupported requests, GET_ID and chains that break the
//! queue count nothing.

use super::request::RequestType;
use super::status;
use crate::virtio::counters::counter_set;

counter_set! {
    /// Counts of completed requests; bytes are request data (not headers or status bytes).
    pub struct BlockCounters {
        read_bytes,
        write_bytes,
        read_ops,
        write_ops,
        flush_ops,
        discard_ops,
        write_zeroes_ops,
        errors,
    }
}

impl BlockCounters {
    /// Counts a request of `kind` that completed with `status`; `bytes` is its data length.
    #[inline]
    pub(super) fn completed(&self, kind: RequestType, bytes: u64, status: u8) {
        if status == status::IOERR {
            self.errors.inc();
            return;
        }
        if status != status::OK {
            return;
        }
        match kind {
            RequestType::In => {
                self.read_ops.inc();
                self.read_bytes.add(bytes);
            }
            RequestType::Out => {
                self.write_ops.inc();
                self.write_bytes.add(bytes);
            }
            RequestType::Flush => self.flush_ops.inc(),
            RequestType::Discard => self.discard_ops.inc(),
            RequestType::WriteZeroes => self.write_zeroes_ops.inc(),
            RequestType::GetId | RequestType::Other(_) => {}
        }
    }
}
