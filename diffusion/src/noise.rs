//! Portable noise: Gaussian samples that depend only on (seed, purpose, step).
//!
//! kiln never draws noise from a device's generator: candle's CPU generator
//! cannot be seeded, and a CUDA generator is shared by every task on the
//! device. Instead, noise comes from Philox4x32-10 (Salmon et al., "Parallel
//! random numbers: as easy as 1, 2, 3", SC 2011), a counter-based generator:
//! each 128-bit block is a pure function of a counter and a key, so any sample
//! can be computed independently, on any machine, in any order. Normals come
//! from Box–Muller computed in `f64` with the pure-Rust `libm`, so they do not
//! depend on the platform's C math library.
//!
//! The layout is part of kiln's reproducibility contract (changing it changes
//! every image): key = the 64-bit seed as (low, high) words; counter = (block
//! index, step, purpose tag, purpose argument); sample `i` comes from block
//! `i / 4`, word `i % 4`, with words paired (0, 1) and (2, 3) for Box–Muller.

/// Why a stream of noise is drawn; each purpose gets an independent stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The initial latents of txt2img.
    InitialLatents,
    /// The fresh noise of an ancestral sampler step.
    AncestralStep,
    /// The noise added to an encoded init image.
    Img2Img,
    /// Weights of a generated test model; the argument identifies the tensor.
    Weights(u32),
    /// The noise added to the upscaled latents of the hires fix's second pass.
    HiresLatents,
    /// The fresh noise of an ancestral step of the hires fix's second pass.
    HiresStep,
}

impl Purpose {
    /// Returns the (tag, argument) counter words; never renumber the tags.
    fn words(self) -> (u32, u32) {
        match self {
            Purpose::InitialLatents => (0, 0),
            Purpose::AncestralStep => (1, 0),
            Purpose::Img2Img => (2, 0),
            Purpose::Weights(id) => (3, id),
            Purpose::HiresLatents => (4, 0),
            Purpose::HiresStep => (5, 0),
        }
    }
}

/// Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011, table 2).
const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Returns one Philox4x32-10 block for `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(PHILOX_W0);
            k[1] = k[1].wrapping_add(PHILOX_W1);
        }
        let p0 = u64::from(PHILOX_M0) * u64::from(c[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(c[2]);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Returns `len` standard normal samples for (seed, purpose, step).
///
/// A shorter request is a prefix of a longer one with the same inputs.
pub fn standard_normal(seed: u64, purpose: Purpose, step: u32, len: usize) -> Vec<f32> {
    let key = [seed as u32, (seed >> 32) as u32];
    let (tag, arg) = purpose.words();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    let mut block = 0u32;
    while out.len() < len {
        let words = philox4x32_10([block, step, tag, arg], key);
        let (a0, a1) = box_muller(words[0], words[1]);
        let (b0, b1) = box_muller(words[2], words[3]);
        out.extend_from_slice(&[a0 as f32, a1 as f32, b0 as f32, b1 as f32]);
        block = block.wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// Maps two uniform words to two independent standard normals (Box and Muller 1958).
fn box_muller(x0: u32, x1: u32) -> (f64, f64) {
    // (x + 0.5) / 2^32 lies strictly inside (0, 1), so ln never sees 0.
    const SCALE: f64 = 1.0 / 4_294_967_296.0;
    let u1 = (f64::from(x0) + 0.5) * SCALE;
    let u2 = (f64::from(x1) + 0.5) * SCALE;
    let r = libm::sqrt(-2.0 * libm::log(u1));
    let theta = 2.0 * std::f64::consts::PI * u2;
    (r * libm::cos(theta), r * libm::sin(theta))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors from Random123's `tests/kat_vectors` ("philox4x32 10" lines):
    /// counter, key, expected output.
    #[test]
    fn philox_matches_random123_known_answers() {
        let vectors: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
            (
                [0, 0, 0, 0],
                [0, 0],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (counter, key, expected) in vectors {
            assert_eq!(
                philox4x32_10(counter, key),
                expected,
                "counter {counter:x?}"
            );
        }
    }

    #[test]
    fn same_inputs_give_same_noise() {
        let a = standard_normal(42, Purpose::InitialLatents, 0, 1000);
        let b = standard_normal(42, Purpose::InitialLatents, 0, 1000);
        assert_eq!(a, b);
    }

    #[test]
    fn shorter_request_is_a_prefix() {
        let long = standard_normal(7, Purpose::AncestralStep, 3, 103);
        let short = standard_normal(7, Purpose::AncestralStep, 3, 10);
        assert_eq!(&long[..10], &short[..]);
    }

    #[test]
    fn seed_step_and_purpose_each_change_the_noise() {
        let base = standard_normal(42, Purpose::InitialLatents, 0, 64);
        let others = [
            standard_normal(43, Purpose::InitialLatents, 0, 64),
            standard_normal(42 | 1 << 40, Purpose::InitialLatents, 0, 64),
            standard_normal(42, Purpose::InitialLatents, 1, 64),
            standard_normal(42, Purpose::AncestralStep, 0, 64),
            standard_normal(42, Purpose::Img2Img, 0, 64),
            standard_normal(42, Purpose::Weights(0), 0, 64),
        ];
        for (i, other) in others.iter().enumerate() {
            let same = base.iter().zip(other).filter(|(a, b)| a == b).count();
            assert_eq!(
                same, 0,
                "variant {i} shares {same} samples with the base stream"
            );
        }
        assert_ne!(
            standard_normal(1, Purpose::Weights(1), 0, 8),
            standard_normal(1, Purpose::Weights(2), 0, 8)
        );
    }

    #[test]
    fn samples_are_standard_normal() {
        let n = 100_000;
        let xs = standard_normal(2024, Purpose::InitialLatents, 0, n);
        assert!(xs.iter().all(|x| x.is_finite()));
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        let var = xs
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        // Standard errors: 1/sqrt(n) = 0.003 for the mean, sqrt(2/n) = 0.0045 for the variance.
        assert!(mean.abs() < 0.015, "mean {mean}");
        assert!((var - 1.0).abs() < 0.025, "variance {var}");
        let within_one = xs.iter().filter(|x| x.abs() < 1.0).count() as f64 / n as f64;
        assert!(
            (within_one - 0.6827).abs() < 0.01,
            "P(|x|<1) = {within_one}"
        );
    }
}
