//! The multifeed meta exchange, sans IO: wire messages and the state machine of the versioned
//! handshake and the feed-list exchange.
//!
//! Two peers each run an [`Exchange`]. Bytes received from the peer go in through
//! [`Exchange::handle`]; what to send and what to do comes out as [`Action`]s. The exchange never
//! touches a socket, a clock or a task, so every state and message can be tested in one thread.
//!
//! The flow: HANDSHAKE (client name, semver version, user data) → RECONCILE rounds (the
//! initiator and the responder compare fingerprints of ranges of their offered (key, length)
//! sets, [negentropy](https://github.com/hoytech/negentropy)'s range-based set reconciliation,
//! until the initiator knows where they differ) → MANIFEST (the feeds I offer that the peer
//! lacks or holds at another length; the initiator also sends NEED, the peer's items it lacks,
//! which the responder answers with its MANIFEST) → REQUEST_FEEDS (the offers I want) →
//! REPLICATE_FEEDS (the requested feeds I will send) → each agreed feed replicates on its own
//! channel → SYNCED (non-live: I hold every feed I asked for) → finished when both sides are
//! synced. Two equal stores agree in one round trip of about 600 bytes, whatever their size.
//! Protocol 1.x (JS multifeed's flow: every feed offered on every connection) is refused with
//! `ERR_VERSION_MISMATCH`.
//!
//! Why negentropy: it is the maintained, specified implementation of range-based set
//! reconciliation (Aljoscha Meyer's method, as iroh-docs uses it), with a conformance suite
//! across languages, bounded frames, and checks on every count it reads; the crate has no
//! dependencies. Its ids are 32 bytes, ours are 24 bytes of the feed key and 8 of SipHash-1-3
//! of the key and length, keyed by both handshake nonces ([`item_id`]): negentropy's
//! fingerprints are sums of ids, so ids must not be predictable, nor lengths add up.
//!
//! ```
//! use multifeed_meta::{Action, Exchange, ExchangeConfig, FeedOffer, Message};
//!
//! let mut alice = Exchange::new(ExchangeConfig { initiator: true, ..ExchangeConfig::default() });
//! let mut bob = Exchange::new(ExchangeConfig::default());
//! let mut to_bob: Vec<Message> = Vec::new();
//! let mut to_alice: Vec<Message> = Vec::new();
//! let send = |actions: Vec<Action>, out: &mut Vec<Message>| {
//!     for action in actions {
//!         if let Action::Send(message) = action {
//!             out.push(message);
//!         }
//!     }
//! };
//! send(alice.start(), &mut to_bob);
//! send(alice.offer(vec![FeedOffer { key: [1; 32], length: 10 }]), &mut to_bob);
//! send(bob.start(), &mut to_alice);
//! send(bob.offer(Vec::new()), &mut to_alice);
//!
//! let mut agreed = Vec::new();
//! while !to_bob.is_empty() || !to_alice.is_empty() {
//!     for message in std::mem::take(&mut to_bob) {
//!         for action in bob.handle(&message.encode()).unwrap() {
//!             match action {
//!                 Action::RemoteOffered(offers) => {
//!                     let keys = offers.iter().map(|o| o.key).collect();
//!                     send(bob.request(keys), &mut to_alice);
//!                 }
//!                 Action::Replicate(keys) => agreed.extend(keys),
//!                 Action::Send(m) => to_alice.push(m),
//!                 _ => {}
//!             }
//!         }
//!     }
//!     for message in std::mem::take(&mut to_alice) {
//!         send(alice.handle(&message.encode()).unwrap(), &mut to_bob);
//!     }
//! }
//! assert_eq!(agreed, vec![[1; 32]]);
//! assert_eq!(bob.wanted().get(&[1; 32]), Some(&10));
//! ```

mod error;
mod exchange;
mod message;
mod reconcile;

pub use error::{DecodeError, MetaError};
pub use exchange::{
    Action, Exchange, ExchangeConfig, CLIENT, PROTOCOL_VERSION, REOPENS_IDLE_CHANNELS,
};
pub use message::{
    FeedKey, FeedOffer, Message, MAX_CLIENT_LEN, MAX_KEYS_PER_MESSAGE, MAX_MESSAGE_BYTES,
    MAX_USER_DATA_LEN, MAX_VERSION_LEN,
};
pub use reconcile::{
    incomplete_item_id, item_id, IdKey, ItemId, MAX_RECONCILE_BYTES, MAX_RECONCILE_ROUNDS,
};
pub use semver;

#[cfg(test)]
mod reconcile_tests;
#[cfg(test)]
mod tests;
