//! GEGLU with the exact GELU, fused: `hidden · gelu(gate)` in one pass.
//!
//! diffusers' `GEGLU` splits its projection into `hidden` and `gate` halves and
//! returns `hidden * F.gelu(gate)`, the exact GELU `x/2 · (1 + erf(x/√2))`.
//! candle's GEGLU uses the tanh approximation, which moved kiln's UNet output
//! about 1e-4 from diffusers'. [`geglu`] computes the exact form, as PyTorch
//! writes it, reading the projection once and writing the half-width result
//! once, in parallel over rows; the chunk and multiply of the unfused form
//! made three more tensors of the feed-forward's widest size. `erf` is the
//! formula PyTorch's vectorised CPU GELU uses (Abramowitz and Stegun 7.1.26,
//! within 7e-7 of erf in f32, with kiln's polynomial `exp`), branch-free so that the
//! loop vectorises, and run through AVX2 where the CPU has it: the same
//! operations in the same order, so results depend on neither the vector width
//! nor the thread count. Devices other than the CPU and dtypes other than f32
//! use candle's `gelu_erf`.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::attend::exp;
use super::operand::contiguous_f32;

/// Rows per parallel task (a row is one token's feed-forward width).
const ROWS_PER_TASK: usize = 16;

/// Returns `hidden · gelu(gate)` where `projection` is `[.., 2·n]`, `hidden` its
/// first `n` columns and `gate` the last `n`: `[.., n]`.
///
/// # Errors
///
/// A candle error when the last dimension is odd or an operation fails.
pub(crate) fn geglu(projection: &Tensor) -> candle_core::Result<Tensor> {
    let width = projection.dim(D::Minus1)?;
    if !width.is_multiple_of(2) {
        return Err(candle_core::Error::Msg(format!(
            "geglu: the projection's last dimension {width} is odd"
        )));
    }
    if projection.device().is_cpu() && projection.dtype() == DType::F32 {
        return projection.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let halves = projection.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// The exact GELU as PyTorch computes it: `x · 0.5 · (1 + erf(x · √½))`.
#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf(x)` within 7e-7 in f32 (Abramowitz and Stegun 7.1.26, as PyTorch's vectorised CPU
/// kernels compute it): `sign(x) · (1 − t·P(t)·e^(−x²))` with `t = 1/(1 + p·|x|)`.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let r = 1.061_405_4 * t - 1.453_152;
    let r = r * t + 1.421_413_7;
    let r = r * t - 0.284_496_74;
    let r = r * t + 0.254_829_6;
    let y = 1.0 - r * t * exp(-(x * x));
    y.copysign(x)
}

/// `out = hidden · gelu(gate)`, elementwise, through AVX2 where the CPU has it.
fn gated(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { gated_avx2(out, hidden, gate) };
    }
    gated_portable(out, hidden, gate)
}

/// [`gated_portable`] compiled for AVX2: the same operations, the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn gated_avx2(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
    gated_portable(out, hidden, gate)
}

/// The body of [`gated`].
#[inline(always)]
fn gated_portable(out: &mut [f32], hidden: &[f32], gate: &[f32]) {
    for ((o, h), g) in out.iter_mut().zip(hidden).zip(gate) {
        *o = h * gelu(*g);
    }
}

/// The CPU kernel.
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "kiln-geglu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let mut dims = layout.shape().dims().to_vec();
        let Some(last) = dims.last_mut() else {
            return Err(candle_core::Error::Msg(
                "kiln-geglu: a scalar has no halves".into(),
            ));
        };
        let n = *last / 2;
        *last = n;
        let mut out = vec![0f32; input.len() / 2];
        if n > 0 {
            out.par_chunks_mut(ROWS_PER_TASK * n)
                .zip(input.par_chunks(ROWS_PER_TASK * 2 * n))
                .for_each(|(out, input)| {
                    for (o, row) in out.chunks_exact_mut(n).zip(input.chunks_exact(2 * n)) {
                        let (hidden, gate) = row.split_at(n);
                        gated(o, hidden, gate);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn is_hidden_times_the_exact_gelu_of_the_gate() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 2., (2, 5, 2 * 7), &Device::Cpu)?;
        let got = geglu(&x)?;
        assert_eq!(got.dims(), &[2, 5, 7]);
        let halves = x.chunk(2, D::Minus1)?;
        let want = (&halves[0] * halves[1].gelu_erf()?)?;
        let diff = (&got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        // Relative to the largest output: the random gates reach |8|, where 1e-6 is
        // a few ulp.
        let scale = want
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
            .max(1.0);
        assert!(diff < 1e-6 * scale, "{diff} (largest output {scale})");
        // Not the tanh approximation: it differs by more than rounding somewhere.
        let tanh = (&halves[0] * halves[1].gelu()?)?;
        let apart = (&got - &tanh)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(apart > 1e-5, "{apart}");
        Ok(())
    }

    #[test]
    fn gelu_matches_known_values() {
        // x/2 · (1 + erf(x/√2)), computed in f64.
        for (x, want) in [
            (1.0f32, 0.841_344_75f64),
            (-1.0, -0.158_655_25),
            (3.0, 2.995_950_5),
        ] {
            assert!(((gelu(x) as f64) - want).abs() < 1e-6, "gelu({x})");
        }
        assert_eq!(gelu(0.0), 0.0);
        // erf itself, against libm's: within 7e-7 (the formula's 1.5e-7, plus f32
        // cancellation in `1 − …` near 0, as in PyTorch).
        let mut x = -6.0f32;
        while x < 6.0 {
            assert!((erf(x) - libm::erff(x)).abs() < 7e-7, "erf({x})");
            x += 0.001;
        }
    }

    #[test]
    fn odd_widths_are_refused() -> candle_core::Result<()> {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        assert!(geglu(&x).is_err());
        Ok(())
    }
}
