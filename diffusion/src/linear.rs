//! kiln's linear layer: on the CPU in f32 the weight is kept transposed, as
//! `[in, out]`, so that the matrix product reads it where it lies.
//!
//! candle's `Linear` multiplies by `weight.t()`, a view of the row-major
//! `[out, in]` weight. `gemm` computes the product transposed (output features
//! as its rows) and packs a row-major left operand before every use, on each of
//! its threads: every call read and rewrote the whole weight twice. That packing
//! dominated the products of few tokens, where the weight is most of the bytes
//! (the SD-1.5 UNet's deepest feed-forward at 256 px, 32 tokens by 5120 → 1280:
//! 12.1 ms a call through candle, 2.9 ms with the weight transposed; 128 tokens:
//! 18.4 against 11.0 ms). Transposed once at load, the weight is column-major for
//! `gemm`, which then reads it in place. The bias is added afterwards, as candle
//! adds it. Products of more than one row and more than 256 outputs are the same
//! sums in the same order as candle's, so their outputs are candle's to the bit
//! (`matches_candles_linear_bit_for_bit`: every projection of an SD-shaped UNet
//! under guidance). Smaller ones differ in the last bits: with the weight
//! row-major, `gemm` sends a one-row product, or one of at most 256 outputs,
//! through dot-product kernels that sum in another order; with it transposed,
//! only a one-row product does. Devices other than the CPU, and dtypes other
//! than f32, use candle's module.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::operand::contiguous_f32;
use crate::product::{Dst, Src, product};

/// A linear layer `x·Wᵀ + b` with diffusers' `weight`/`bias` names.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Weight,
    /// `[out]`, added after the product.
    bias: Option<Tensor>,
    /// Output features.
    out_features: usize,
}

/// The weight in the form the forward pass uses.
#[derive(Debug)]
enum Weight {
    /// CPU, f32: `[in, out]`, contiguous.
    Transposed(Tensor),
    /// Any other device or dtype: `[out, in]`, for candle's module.
    Candle(candle_nn::Linear),
}

/// Loads a linear layer with a bias from `vb` (`weight` `[out, in]`, `bias`).
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Linear::from_candle(candle_nn::linear(in_dim, out_dim, vb)?)
}

/// Loads a linear layer without a bias from `vb` (`weight` `[out, in]`).
pub(crate) fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    Linear::from_candle(candle_nn::linear_no_bias(in_dim, out_dim, vb)?)
}

impl Linear {
    /// A layer of `weight` `[out, in]` and `bias` `[out]`.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out_features, _) = weight.dims2()?;
        let weight = match weight.device().is_cpu() && weight.dtype() == DType::F32 {
            true => Weight::Transposed(weight.t()?.contiguous()?),
            false => Weight::Candle(candle_nn::Linear::new(weight, None)),
        };
        Ok(Linear {
            weight,
            bias,
            out_features,
        })
    }

    /// Takes candle's module apart (its weight is transposed and candle's copy dropped).
    fn from_candle(inner: candle_nn::Linear) -> candle_core::Result<Self> {
        Linear::new(inner.weight().clone(), inner.bias().cloned())
    }

    /// Output features: the last dimension of the output.
    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let product = match &self.weight {
            Weight::Transposed(wt) => xs.contiguous()?.apply_op2_no_bwd(wt, &LinearOp)?,
            Weight::Candle(linear) => linear.forward(xs)?,
        };
        match &self.bias {
            Some(bias) => product.broadcast_add(bias),
            None => Ok(product),
        }
    }
}

/// `x·W` for `x` `[.., in]` and the transposed weight `W` `[in, out]`.
struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "kiln-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), s1, l1)?;
        let weight = contiguous_f32(self.name(), s2, l2)?;
        let (in_dim, out_dim) = l2.shape().dims2()?;
        let mut dims = l1.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == in_dim => *last = out_dim,
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "kiln-linear: input {:?} does not end in the weight's {in_dim} input features",
                    l1.shape().dims()
                )));
            }
        }
        let rows = input.len().checked_div(in_dim).unwrap_or(0);
        let mut out = vec![0f32; rows * out_dim];
        // out (rows × out_dim) = input (rows × in_dim) · weight (in_dim × out_dim)
        product(
            Dst {
                data: &mut out,
                rs: out_dim,
                cs: 1,
                accumulate: false,
            },
            (rows, out_dim, in_dim),
            Src {
                data: input,
                rs: in_dim,
                cs: 1,
            },
            Src {
                data: weight,
                rs: out_dim,
                cs: 1,
            },
            1.0,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};

    use super::Linear;

    /// Values from a formula, the same on every run (candle's `randn` is unseeded).
    fn values(shape: &[usize], seed: usize) -> candle_core::Result<Tensor> {
        let n = shape.iter().product::<usize>();
        let data: Vec<f32> = (0..n)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) % 1000) as f32 - 500.0)
                    / 2000.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    /// The shapes of an SD-1.5 UNet's projections at 256 px (few tokens against a wide
    /// weight, many tokens against a narrow one), a batch of two, and odd sizes that
    /// leave partial `gemm` panels; with and without a bias.
    #[test]
    fn matches_candles_linear_bit_for_bit() -> candle_core::Result<()> {
        for (input, out, with_bias) in [
            (vec![2, 16, 5120], 1280, true),
            (vec![64, 1280], 10240, true),
            (vec![2, 1024, 320], 320, false),
            (vec![3, 7, 37], 29, true),
            (vec![2, 1280], 640, true),
            (vec![1, 77, 768], 320, false),
        ] {
            let in_dim = input[input.len() - 1];
            let xs = values(&input, 1)?;
            let weight = values(&[out, in_dim], 2)?;
            let bias = with_bias.then(|| values(&[out], 3)).transpose()?;
            let want = candle_nn::Linear::new(weight.clone(), bias.clone()).forward(&xs)?;
            let got = Linear::new(weight, bias)?.forward(&xs)?;
            assert_eq!(got.dims(), want.dims(), "{input:?} -> {out}");
            let (got, want) = (
                got.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?,
            );
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(differ, 0, "{input:?} -> {out}: {differ} outputs differ");
        }
        Ok(())
    }

    #[test]
    fn refuses_an_input_of_another_width() -> candle_core::Result<()> {
        let layer = Linear::new(values(&[8, 4], 1)?, None)?;
        let err = layer.forward(&values(&[2, 5], 2)?).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("input features"), "{err}");
        Ok(())
    }

    /// Small products and strided inputs: candle's values within float rounding.
    #[test]
    fn small_and_strided_inputs_give_the_product() -> candle_core::Result<()> {
        let weight = values(&[6, 4], 1)?;
        let layer = Linear::new(weight.clone(), Some(values(&[6], 3)?))?;
        let reference = candle_nn::Linear::new(weight, Some(values(&[6], 3)?));
        for xs in [values(&[4, 3], 2)?.t()?, values(&[1, 4], 4)?] {
            let want = reference.forward(&xs.contiguous()?)?;
            let got = layer.forward(&xs)?;
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{diff}");
        }
        Ok(())
    }
}
