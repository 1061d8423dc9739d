//! Deterministic tests of the connection core: two cores stepped against each other on the
//! simulated link of [`super::sim`].

mod props;
mod scenarios;
