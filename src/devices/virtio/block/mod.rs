//! virtio-blk (owned by the block work; placeholder until it lands).
