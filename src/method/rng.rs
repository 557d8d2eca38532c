//! A counter-based random generator for DARE masks: each draw is a pure function of
//! (seed, tensor name, model, element index), so masks do not depend on chunking or
//! threads.

/// Mixes a 64-bit value (the SplitMix64 finalizer, a bijection with good avalanche).
#[inline(always)]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Returns the key of one (seed, tensor, model) stream.
pub fn stream_key(seed: u64, tensor: &str, model: usize) -> u64 {
    // FNV-1a over the name, then mixed with the seed and model.
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in tensor.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(mix(seed ^ mix(h)) ^ (model as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Returns a uniform draw in [0, 1) with 53 random bits for element `index` of a stream.
#[inline(always)]
pub fn uniform(key: u64, index: u64) -> f64 {
    let bits = mix(key ^ mix(index.wrapping_add(0x9E37_79B9_7F4A_7C15)));
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_mean_and_keep_rate() {
        let key = stream_key(7, "layers.0.weight", 1);
        let n = 200_000;
        let kept = (0..n).filter(|&i| uniform(key, i) < 0.3).count();
        let rate = kept as f64 / n as f64;
        assert!((rate - 0.3).abs() < 0.005, "keep rate {rate}");
    }

    #[test]
    fn streams_differ() {
        assert_ne!(stream_key(1, "a", 0), stream_key(1, "a", 1));
        assert_ne!(stream_key(1, "a", 0), stream_key(1, "b", 0));
        assert_ne!(stream_key(1, "a", 0), stream_key(2, "a", 0));
    }
}
