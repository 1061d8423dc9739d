//! The hypercore 0.16 adapter: the one place replication touches a hypercore (proofs, probes,
//! promotion, tree lookups), with the workarounds hypercore 0.16 needs to survive a hostile
//! peer. The core (`crate::proto`) decides; the driver carries its outputs out through here.
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
use multifeed_storage::{FeedKey, SharedCore};

use crate::{FeedHost, ReplicateError};

/// The proof answering `request` from `core`, never with bytes the feed's own tree
/// contradicts (the host checks each block: a damaged one is answered with `None`, NoData).
pub(crate) async fn serve(
    core: &SharedCore,
    host: &dyn FeedHost,
    request: &Request,
) -> Option<Proof> {
    let (proof, key) = {
        let mut core = core.lock().await;
        let key = core.key_pair().public.to_bytes();
        (create_proof(&mut core, request).await?, key)
    };
    if let Some(block) = &proof.block {
        if !host.block_intact(&key, block.index, &block.value).await {
            return None;
        }
    }
    Some(proof)
}

/// How many tree nodes a request for block `index` asks for: those the feed lacks to verify it.
pub(crate) async fn missing_nodes(core: &SharedCore, index: u64) -> Result<u64, ReplicateError> {
    missing_nodes_locked(&mut *core.lock().await, index).await
}

/// [`missing_nodes`] of a core already locked.
pub(crate) async fn missing_nodes_locked(
    core: &mut Hypercore,
    index: u64,
) -> Result<u64, ReplicateError> {
    let key = core.key_pair().public.to_bytes();
    core.missing_nodes(index)
        .await
        .map_err(|e| ReplicateError::hypercore(&key, e))
}

/// A probe's first signed root verified: the host records the feed and the same proof is
/// applied to the host's core (unless another connection added it meanwhile: then it has this
/// root already). Returns the host's core.
pub(crate) async fn promote(
    host: &dyn FeedHost,
    key: &FeedKey,
    proof: &Proof,
) -> Result<SharedCore, ReplicateError> {
    let core = host
        .add_remote_feed(key)
        .await
        .map_err(ReplicateError::Host)?;
    {
        let mut real = core.lock().await;
        if real.info().length == 0 {
            match apply_proof(&mut real, proof).await {
                Applied::Verified(_) => {}
                Applied::Io(err) => return Err(ReplicateError::hypercore(key, err)),
                Applied::Invalid(reason) => {
                    return Err(ReplicateError::InvalidProof { key: *key, reason })
                }
            }
        }
    }
    core.notify_changed();
    Ok(core)
}

/// An in-memory hypercore for a feed we do not hold yet (4 KiB pages: a probe costs little).
pub(crate) async fn probe_core(key: &FeedKey) -> Result<SharedCore, ReplicateError> {
    use hypercore::{HypercoreBuilder, PartialKeypair, Storage, StorageTraits};
    let create = |_| {
        async {
            Ok(
                Box::new(random_access_memory::RandomAccessMemory::new(4096))
                    as Box<dyn StorageTraits + Send>,
            )
        }
        .boxed()
    };
    let storage = Storage::open(create, false)
        .await
        .map_err(|e| ReplicateError::hypercore(key, e))?;
    let public = hypercore::VerifyingKey::from_bytes(key).map_err(|_| {
        ReplicateError::hypercore(
            key,
            HypercoreError::InvalidOperation {
                context: "not an ed25519 public key".to_owned(),
            },
        )
    })?;
    let core = HypercoreBuilder::new(storage)
        .key_pair(PartialKeypair {
            public,
            secret: None,
        })
        .build()
        .await
        .map_err(|e| ReplicateError::hypercore(key, e))?;
    Ok(SharedCore::new(core))
}

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

/// The core's view of a hypercore, read under its lock.
impl crate::proto::FeedView for Hypercore {
    fn info(&self) -> crate::proto::FeedInfo {
        let info = hypercore::Hypercore::info(self);
        crate::proto::FeedInfo {
            fork: info.fork,
            length: info.length,
            contiguous_length: info.contiguous_length,
        }
    }

    fn has(&self, index: u64) -> bool {
        hypercore::Hypercore::has(self, index)
    }
}
