//! What the core reads of a feed: a small synchronous view the owner hands in with each input
//! about the feed (for a hypercore, its `info()` and `has()` under its lock: see
//! `crate::adapter`).

/// A feed's fork and lengths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FeedInfo {
    /// The fork id of the feed's history.
    pub(crate) fork: u64,
    /// The signed length we know.
    pub(crate) length: u64,
    /// The blocks from 0 we hold (as the feed reports it; the core checks it against `has`).
    pub(crate) contiguous_length: u64,
}

/// A synchronous look at one feed.
pub(crate) trait FeedView {
    /// Its fork and lengths.
    fn info(&self) -> FeedInfo;
    /// Whether block `index` is held.
    fn has(&self, index: u64) -> bool;
}
