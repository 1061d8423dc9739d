//! Deterministic tests of the connection core: two cores stepped against each other.

mod pair;
mod scenarios;
