//! Randomness good enough for server-assigned client ids and for spreading
//! reconnects: the std hasher's per-process random keys mixed with the
//! clock. Not for secrets.

use std::hash::{BuildHasher, Hasher};

/// A random 64-bit number.
pub(crate) fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
