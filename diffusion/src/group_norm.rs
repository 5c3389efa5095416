//! Group norm in one pass per group, with the SiLU that follows it fused.
//!
//! candle's `GroupNorm` is seven tensor operations (sum, subtract, square,
//! sum, add, sqrt, divide, then scale and shift), each a full pass over the
//! activations and a fresh allocation, and a ResNet block adds an eighth for
//! its SiLU. [`GroupNorm`] computes each (image, group)'s mean and variance
//! (two passes, summed in f64 over eight fixed lanes) and writes
//! `x·scale + shift` per channel, optionally through SiLU, in one more pass, in
//! parallel over images and groups. Results depend on neither the thread count
//! nor the rest of the batch. Devices other than the CPU and dtypes other than
//! f32 use candle's module.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::attend::exp;
use super::operand::contiguous_f32;

/// A group norm over `[batch, channels, ..]` with learned scale and shift.
#[derive(Debug)]
pub(crate) struct GroupNorm {
    /// candle's module: the reference, and the path off the CPU.
    inner: candle_nn::GroupNorm,
    /// The scale and shift as plain values, when the weights are f32 on the CPU.
    params: Option<Params>,
    groups: usize,
    eps: f64,
}

/// Per-channel scale and shift.
#[derive(Debug)]
struct Params {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// Loads `weight` and `bias` of a group norm over `channels` in `groups` groups.
pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder,
) -> candle_core::Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    let params = match weight.device().is_cpu() && weight.dtype() == DType::F32 {
        true => Some(Params {
            weight: weight.to_vec1()?,
            bias: bias.to_vec1()?,
        }),
        false => None,
    };
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
        params,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// Returns `silu(norm(xs))`.
    pub(crate) fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        match &self.params {
            Some(params) if xs.device().is_cpu() && xs.dtype() == DType::F32 => {
                xs.contiguous()?.apply_op1_no_bwd(&Fused {
                    params,
                    groups: self.groups,
                    eps: self.eps,
                    silu,
                })
            }
            _ => {
                let out = self.inner.forward(xs)?;
                match silu {
                    true => candle_nn::ops::silu(&out),
                    false => Ok(out),
                }
            }
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, false)
    }
}

/// The CPU kernel.
struct Fused<'a> {
    params: &'a Params,
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Sums `values` (mapped by `f`) in f64 over eight fixed lanes.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (x, lane) in chunk.iter().zip(lanes.iter_mut()) {
            *lane += f(*x as f64);
        }
    }
    for (x, lane) in chunks.remainder().iter().zip(lanes.iter_mut()) {
        *lane += f(*x as f64);
    }
    let [a, b, c, d, e, g, h, i] = lanes;
    ((a + b) + (c + d)) + ((e + g) + (h + i))
}

impl Fused<'_> {
    /// Normalises one group: `input` and `out` hold its channels (`first` onwards) in order.
    fn group(&self, input: &[f32], out: &mut [f32], first: usize) {
        let n = input.len() as f64;
        let mean = lane_sum(input, |x| x) / n;
        let var = lane_sum(input, |x| (x - mean) * (x - mean)) / n;
        let inv = 1.0 / (var + self.eps).sqrt();
        let per_channel = input.len() / (self.params.weight.len() / self.groups);
        for (c, (x, o)) in input
            .chunks_exact(per_channel)
            .zip(out.chunks_exact_mut(per_channel))
            .enumerate()
        {
            let scale = self.params.weight[first + c] as f64 * inv;
            let shift = self.params.bias[first + c] as f64 - mean * scale;
            let (scale, shift) = (scale as f32, shift as f32);
            if self.silu {
                silu_affine(x, o, scale, shift);
            } else {
                for (o, x) in o.iter_mut().zip(x) {
                    *o = x * scale + shift;
                }
            }
        }
    }
}

/// `o = silu(x·scale + shift)`, vectorised with AVX2 where the CPU has it (same bits).
fn silu_affine(x: &[f32], o: &mut [f32], scale: f32, shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { silu_affine_avx2(x, o, scale, shift) };
    }
    silu_affine_portable(x, o, scale, shift)
}

/// [`silu_affine_portable`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn silu_affine_avx2(x: &[f32], o: &mut [f32], scale: f32, shift: f32) {
    silu_affine_portable(x, o, scale, shift)
}

/// The body of [`silu_affine`].
#[inline(always)]
fn silu_affine_portable(x: &[f32], o: &mut [f32], scale: f32, shift: f32) {
    for (o, x) in o.iter_mut().zip(x) {
        let y = x * scale + shift;
        *o = y / (1.0 + exp(-y));
    }
}

impl CustomOp1 for Fused<'_> {
    fn name(&self) -> &'static str {
        "kiln-group-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let dims = layout.shape().dims();
        let channels = self.params.weight.len();
        if dims.len() < 3 || dims[1] != channels || !channels.is_multiple_of(self.groups) {
            return Err(candle_core::Error::Msg(format!(
                "kiln-group-norm: input {dims:?} does not have {channels} channels in {} groups",
                self.groups
            )));
        }
        let group_len = input.len() / dims[0] / self.groups;
        let per_group = channels / self.groups;
        let mut out = vec![0f32; input.len()];
        if group_len > 0 {
            out.par_chunks_mut(group_len)
                .zip(input.par_chunks(group_len))
                .enumerate()
                .for_each(|(i, (out, input))| {
                    self.group(input, out, (i % self.groups) * per_group)
                });
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{Device, IndexOp};

    use super::*;

    #[test]
    fn matches_candles_group_norm_and_silu() -> candle_core::Result<()> {
        let cpu = &Device::Cpu;
        let mut tensors = HashMap::new();
        tensors.insert("weight".into(), Tensor::randn(1f32, 0.3, 12, cpu)?);
        tensors.insert("bias".into(), Tensor::randn(0f32, 0.3, 12, cpu)?);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, cpu);
        let norm = group_norm(4, 12, 1e-6, vb)?;
        // An offset mean, as activations have, and an odd pixel count.
        let xs = (Tensor::randn(0f32, 2., (2, 12, 5, 7), cpu)? + 3.0)?;
        let reference = norm.inner.forward(&xs)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let diff = max_diff(&norm.forward(&xs)?, &reference)?;
        assert!(diff < 1e-5, "group norm: {diff}");
        let silu = norm.forward_silu(&xs)?;
        let diff = max_diff(&silu, &candle_nn::ops::silu(&reference)?)?;
        assert!(diff < 1e-5, "group norm + silu: {diff}");
        // The second image alone gives the second image's output.
        let values = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        assert!(values(norm.forward_silu(&xs.i(1..2)?)?)? == values(silu.i(1..2)?)?);
        Ok(())
    }
}
