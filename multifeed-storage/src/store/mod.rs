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

mod disk;
mod fd_pool;
mod memory;
mod page_cache;

pub use disk::DiskStore;
pub use fd_pool::FdPool;
pub use memory::MemoryStore;
