//! Fast `random-access-storage` backends: in memory, and on disk with a bounded descriptor pool.
//!
//! # Durability contract
//!
//! [`DiskStore`] writes with positioned `pwrite` calls straight into the OS page cache and never
//! fsyncs on its own: every acknowledged write survives a killed process (SIGKILL), because the
//! kernel still holds it. It survives a power loss or kernel crash only once `sync_all` (or
//! [`FdPool::sync_all`], which covers every store of the pool) has returned. The multifeed's
//! `Durability::Sync` option calls it at batch boundaries: after each append batch, each burst of
//! replicated blocks, each index record, and on close — never per block.
//!
//! Writes are held back in the process only where no acknowledgement depends on them: a
//! feed's tree, data and bitfield writes until the operation's oplog write, and, in a replica's
//! directory (which takes no local appends), also the oplog entries of received blocks, until
//! the next oplog header (every fourth operation), a read of block data, or
//! [`FdPool::write_held`], which the multifeed calls after each batch of replicated blocks. A
//! kill can then lose the last few received blocks of a replica — fetched again on the next
//! replication — but never leaves a feed that does not reopen: held writes reach the files in
//! the order hypercore wrote them (block data may come earlier, as unused bytes).

mod disk;
mod fd_pool;
mod memory;
mod page_cache;

pub use disk::DiskStore;
pub use fd_pool::FdPool;
pub use memory::MemoryStore;
