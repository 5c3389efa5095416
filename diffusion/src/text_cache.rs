//! The text-embedding cache and A1111's emphasis (prompt weighting) on encoded chunks.
//!
//! The cache holds the encoder's output for one *chunk*: a window of token ids
//! (bos, up to 75 tokens, eos, padding) as one encoder reads it. A chunk is
//! encoded on its own, so its states depend on nothing but the model, the
//! encoder and the ids; caching at this level lets every render share what is
//! equal: the empty chunk that pads negative prompts, a negative prompt used by
//! a whole job, and the chunk a series repeats in every shot (its character
//! text, when a `BREAK` puts it in a chunk of its own). Weights are applied
//! after the cache ([`emphasize`]), so `(red:1.3)` and `red` share an entry too.
//!
//! Each pipeline owns one cache, so the key needs no model hash, dtype or device:
//! those are the pipeline's. It names the text-encoder LoRA set the encoder was
//! merged with, and a textual-inversion embedding's vectors have token ids of
//! their own (`embeddings`), so chunks that read other weights never share an entry. Entries live on the device; the cache is bounded by
//! a count ([`CAPACITY`]), least recently used out first.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

/// Entries kept: 256 chunks of SD 1.5 (77 × 768 f32, 236 KiB each) are about 60 MiB,
/// of SDXL's two encoders (77 × 768 and 77 × 1280) about 160 MiB together.
pub(crate) const CAPACITY: usize = 256;

/// What the cache is keyed by: which encoder of the pipeline, and the chunk's ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ChunkKey {
    /// 0 for `text_encoder`, 1 for SDXL's `text_encoder_2`.
    pub(crate) encoder: usize,
    /// The text-encoder LoRA set merged into the encoder; empty for the base one.
    /// (Embeddings need no field: their vectors have token ids of their own.)
    pub(crate) variant: String,
    /// The framed, padded window of token ids.
    pub(crate) ids: Vec<u32>,
}

/// One encoded chunk.
#[derive(Clone, Debug)]
pub(crate) struct ChunkStates {
    /// `[1, window, width]`: the per-token states the UNet reads, unweighted.
    pub(crate) states: Tensor,
    /// `[1, width]`: the final-layer-normed state at the first eos, before the
    /// projection, when the encoder has one (SDXL's second).
    pub(crate) pooled: Option<Tensor>,
}

/// A least-recently-used map from chunks to their states.
#[derive(Debug)]
pub(crate) struct ChunkCache {
    /// Entries and the tick of their last use.
    entries: HashMap<ChunkKey, (ChunkStates, u64)>,
    /// Incremented on every use; orders the entries by recency.
    tick: u64,
    /// Most entries kept.
    capacity: usize,
    /// Lookups answered from the cache, for tests and logs.
    hits: u64,
    /// Lookups that had to encode.
    misses: u64,
}

impl ChunkCache {
    /// Returns an empty cache of at most `capacity` entries.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            tick: 0,
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    /// Returns the states of `key` and marks them recently used, or counts a miss.
    pub(crate) fn get(&mut self, key: &ChunkKey) -> Option<ChunkStates> {
        self.tick += 1;
        match self.entries.get_mut(key) {
            Some((states, used)) => {
                *used = self.tick;
                self.hits += 1;
                Some(states.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Stores `states` under `key`, evicting the least recently used entry when full.
    pub(crate) fn insert(&mut self, key: ChunkKey, states: ChunkStates) {
        self.tick += 1;
        if self.capacity == 0 {
            return;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let coldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = coldest {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, (states, self.tick));
    }

    /// Returns (hits, misses, entries).
    pub(crate) fn stats(&self) -> (u64, u64, usize) {
        (self.hits, self.misses, self.entries.len())
    }
}

/// Applies prompt weights to one encoded chunk the way AUTOMATIC1111's web UI does
/// ("Original" emphasis, `modules/sd_emphasis.py`): each token's state is multiplied
/// by its weight, then the whole chunk is rescaled so that its mean is what it was
/// (`z *= w; z *= mean_before / mean_after`).
///
/// `states` is `[1, window, width]`, `weights` one per position (1 for bos, eos and
/// padding). A chunk whose weights are all 1 is returned untouched, bit for bit; so
/// is the rescale when the weighted mean is 0. The arithmetic runs in f32 whatever
/// the model's dtype.
///
/// # Errors
///
/// When `weights` does not match the window or a tensor operation fails.
pub(crate) fn emphasize(states: &Tensor, weights: &[f32]) -> candle_core::Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(states.clone());
    }
    let dtype = states.dtype();
    let z = states.to_dtype(DType::F32)?;
    let before = z.mean_all()?.to_scalar::<f32>()?;
    let w = Tensor::from_slice(weights, (1, weights.len(), 1), z.device())?;
    let z = z.broadcast_mul(&w)?;
    let after = z.mean_all()?.to_scalar::<f32>()?;
    let z = if after != 0.0 && (before / after).is_finite() {
        (z * f64::from(before / after))?
    } else {
        z
    };
    z.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn entry(value: f32) -> ChunkStates {
        ChunkStates {
            states: Tensor::new(&[[[value]]], &Device::Cpu).unwrap(),
            pooled: None,
        }
    }

    fn key(id: u32) -> ChunkKey {
        ChunkKey {
            encoder: 0,
            variant: String::new(),
            ids: vec![id],
        }
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let mut cache = ChunkCache::new(2);
        cache.insert(key(1), entry(1.0));
        cache.insert(key(2), entry(2.0));
        assert!(cache.get(&key(1)).is_some(), "1 is now the hottest");
        cache.insert(key(3), entry(3.0));
        assert!(cache.get(&key(2)).is_none(), "2 was the coldest");
        assert!(cache.get(&key(1)).is_some() && cache.get(&key(3)).is_some());
        assert_eq!(cache.stats(), (3, 1, 2));
        let other_encoder = ChunkKey {
            encoder: 1,
            variant: String::new(),
            ids: vec![1],
        };
        assert!(cache.get(&other_encoder).is_none());
    }

    #[test]
    fn emphasis_scales_tokens_and_keeps_the_mean() -> candle_core::Result<()> {
        let z = Tensor::new(&[[[1.0f32, 3.0], [2.0, 2.0], [4.0, 0.0]]], &Device::Cpu)?;
        assert_eq!(
            emphasize(&z, &[1.0, 1.0, 1.0])?.to_vec3::<f32>()?,
            z.to_vec3::<f32>()?
        );
        let out = emphasize(&z, &[1.0, 2.0, 1.0])?;
        // Weighted: [1, 3], [4, 4], [4, 0]: mean 16/6; the original mean is 12/6.
        let factor = 12.0f32 / 16.0;
        let want = [[1.0, 3.0], [4.0, 4.0], [4.0, 0.0]].map(|r| r.map(|x: f32| x * factor));
        let got = out.to_vec3::<f32>()?;
        for (g, w) in got[0].iter().zip(want) {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() < 1e-6, "{got:?}");
            }
        }
        let mean = out.mean_all()?.to_scalar::<f32>()?;
        assert!((mean - 2.0).abs() < 1e-6, "{mean}");
        Ok(())
    }
}
