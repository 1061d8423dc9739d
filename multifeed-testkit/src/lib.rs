//! Test tools for multifeed and the apps built on it: seeded fault-injecting links, peer
//! builders, topologies and convergence checks.
