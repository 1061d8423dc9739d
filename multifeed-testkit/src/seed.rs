//! Seeds: one master seed per test, printed so that a failure replays.

use rand::rngs::StdRng;
use rand::SeedableRng;

/// The environment variable that replays a seed.
pub const SEED_ENV: &str = "MULTIFEED_SEED";

/// A master seed from which every random choice of a test derives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub u64);

impl Seed {
    /// `MULTIFEED_SEED` if set, else a random seed; prints `MULTIFEED_SEED=<n>` to stderr.
    pub fn from_env_or_random() -> Self {
        let seed = std::env::var(SEED_ENV)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("{SEED_ENV}={seed}");
        Self(seed)
    }

    /// An independent generator for one purpose (`stream`), the same for the same seed.
    pub fn rng(self, stream: u64) -> StdRng {
        StdRng::seed_from_u64(mix(self.0 ^ mix(stream.wrapping_add(0x9e37_79b9_7f4a_7c15))))
    }

    /// A derived seed, for example one per run of a sweep.
    pub fn derive(self, stream: u64) -> Self {
        Self(mix(self.0 ^ mix(stream)))
    }
}

/// SplitMix64's finaliser: spreads nearby seeds apart.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
