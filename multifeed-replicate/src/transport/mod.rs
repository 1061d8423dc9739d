//! The encrypted, framed transport under `hypercore-protocol`.

mod batch;
mod framing;
mod secure;

pub(crate) use secure::SecureChannel;
