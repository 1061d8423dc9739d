//! The hypercore 0.16 adapter for proofs: the one place replication creates or applies a proof,
//! with the workarounds hypercore 0.16 needs to survive a hostile peer.
//!
//! * Requests hypercore would panic on (a hash or seek request, a block or upgrade past our
//!   length, more than 64 tree levels) are refused before it sees them ([`servable`]);
//!   random requests panicked it about one in five.
//! * Proofs with a node hash that is not 32 bytes are refused before it applies them
//!   ([`well_formed`]): it would panic later, when writing the node.
//! * A panic it still finds, creating or applying a proof, is contained: an unanswerable
//!   request, or an invalid proof.
//!
//! Everything here is synchronous in what it decides; the awaits are hypercore's own storage.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use hypercore::{Hypercore, HypercoreError};
use hypercore_protocol::schema::{Data, Request};
use hypercore_schema::Proof;

/// The proof answering `request`, or `None` when we cannot answer it (we lack the data, the
/// request makes no sense for this feed, or hypercore failed or panicked on it).
pub(crate) async fn create_proof(core: &mut Hypercore, request: &Request) -> Option<Proof> {
    if !servable(request, core.info().length) {
        return None;
    }
    AssertUnwindSafe(core.create_proof(
        request.block.clone(),
        request.hash.clone(),
        request.seek.clone(),
        request.upgrade.clone(),
    ))
    .catch_unwind()
    .await
    .ok()
    .and_then(Result::ok)
    .flatten()
}

/// What applying a proof from the peer did.
#[derive(Debug)]
pub(crate) enum Applied {
    /// Verified; `true` if hypercore stored anything (false: another fork, nothing new).
    Verified(bool),
    /// It does not verify (or made hypercore panic): the peer is buggy or lying.
    Invalid(String),
    /// Our storage failed (I/O): says nothing about the peer.
    Io(HypercoreError),
}

/// Verifies and applies a proof from the peer.
pub(crate) async fn apply_proof(core: &mut Hypercore, proof: &Proof) -> Applied {
    match AssertUnwindSafe(core.verify_and_apply_proof(proof))
        .catch_unwind()
        .await
    {
        Ok(Ok(changed)) => Applied::Verified(changed),
        Ok(Err(err @ HypercoreError::IO { .. })) => Applied::Io(err),
        Ok(Err(err)) => Applied::Invalid(err.to_string()),
        Err(_) => Applied::Invalid("hypercore panicked while verifying the proof".to_owned()),
    }
}

/// Whether a peer's request is one hypercore 0.16 answers without panicking: a block below our
/// length, an upgrade that ends within it (and after the block), neither hash nor seek (we never
/// ask for those, and hypercore panics on many of them). `nodes` counts tree levels, at most 64.
pub(crate) fn servable(request: &Request, length: u64) -> bool {
    if request.hash.is_some() || request.seek.is_some() {
        return false;
    }
    let end = match &request.upgrade {
        Some(upgrade) => match upgrade.start.checked_add(upgrade.length) {
            Some(end) if upgrade.length > 0 && end <= length => end,
            _ => return false,
        },
        None => length,
    };
    match &request.block {
        Some(block) => block.index < end && block.nodes <= 64,
        None => request.upgrade.is_some(),
    }
}

/// Whether every node of a proof has a 32-byte hash (hypercore 0.16 panics later, when it writes
/// a node with another length, instead of refusing the proof).
pub(crate) fn well_formed(data: &Data) -> bool {
    let ok = |nodes: &[hypercore_schema::Node]| nodes.iter().all(|n| n.hash.len() == 32);
    data.block.as_ref().is_none_or(|b| ok(&b.nodes))
        && data.hash.as_ref().is_none_or(|h| ok(&h.nodes))
        && data.seek.as_ref().is_none_or(|s| ok(&s.nodes))
        && data
            .upgrade
            .as_ref()
            .is_none_or(|u| ok(&u.nodes) && ok(&u.additional_nodes))
}
