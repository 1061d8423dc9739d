//! The encrypted, framed transport under `hypercore-protocol`.

mod batch;
mod framing;
mod guard;
mod inspect;
mod secure;

#[cfg(any(test, feature = "hostile-peer"))]
pub(crate) use batch::{put_varint, split_channels};
pub(crate) use guard::Guard;
pub(crate) use inspect::{weight_of_message, FrameLimits};
pub(crate) use secure::SecureChannel;
