//! The attention blocks: the UNet's `Transformer2DModel` and the VAE's
//! self-attention, on kiln's attention kernel and fused GEGLU.
//!
//! These follow diffusers' `Transformer2DModel` / `BasicTransformerBlock` /
//! `Attention` / `FeedForward` (and candle's `SpatialTransformer`, which they
//! replace) with the same tensor names, but attend with [`attend::attention`]
//! (query blocks, online softmax, no score matrix; scores scaled once by
//! `1/√d`, as diffusers' processors do) straight from the projections' layout,
//! and run the feed-forward's GEGLU with the exact GELU ([`geglu::geglu`]), as
//! diffusers does. [`VaeAttention`] is the VAE mid block's one-head attention
//! (diffusers' `Attention` with `group_norm`, legacy `query/key/value/proj_attn`
//! names or the current `to_q/to_k/to_v/to_out.0`, either as linear or 1×1-conv
//! weights).
//!
//! Every operation works per batch row (layer norms, the attention kernel) or on
//! a product over all rows (the projections), so a task's rows get the bytes
//! they get alone whenever the UNet's `batches_exactly` holds.

use candle_core::{Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::attend;
use super::geglu;
use super::group_norm::{self, GroupNorm};
use super::linear::{self, Linear};

/// Settings of a [`Transformer2D`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct TransformerConfig {
    /// Attention heads.
    pub(crate) heads: usize,
    /// `BasicTransformerBlock`s.
    pub(crate) depth: usize,
    /// Groups of the input group norm.
    pub(crate) groups: usize,
    /// Width of the text states of the cross-attention.
    pub(crate) context_dim: usize,
    /// Linear rather than 1×1-conv projections in and out (SD 2.x, SDXL).
    pub(crate) use_linear_projection: bool,
}

/// diffusers' `Attention` without a norm of its own: q from `xs`, k and v from the
/// context (or `xs`), `heads` heads, `to_out.0`.
#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// `1/√(head width)`.
    scale: f64,
    /// The projections' time, for `kiln bench pipeline --profile`.
    span: tracing::Span,
    /// The attention kernel's time.
    attend_span: tracing::Span,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        span: tracing::Span,
    ) -> candle_core::Result<Self> {
        let head_dim = query_dim / heads;
        Ok(Self {
            to_q: linear::linear_no_bias(query_dim, query_dim, vb.pp("to_q"))?,
            to_k: linear::linear_no_bias(context_dim, query_dim, vb.pp("to_k"))?,
            to_v: linear::linear_no_bias(context_dim, query_dim, vb.pp("to_v"))?,
            to_out: linear::linear(query_dim, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            span,
            attend_span: tracing::trace_span!("attend"),
        })
    }

    /// Attends `xs` `[batch, tokens, dim]` to `context` (`xs` itself when none).
    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let attended = {
            let _attending = self.attend_span.enter();
            attend::attention(&q, &k, &v, self.heads, self.scale)?
        };
        self.to_out.forward(&attended)
    }
}

/// Most bytes of the feed-forward's widest activation (its GEGLU's input, eight
/// times the model width per row) at once on the CPU: below the C allocator's
/// mapping threshold (`allocator.rs`), so each chunk reuses heap memory instead of
/// a fresh mapping the kernel zeroes and faults in page by page (at 512 px an SD 1.5
/// first-level feed-forward would otherwise map 84 MB and 42 MB on every call).
const FF_CHUNK_BYTES: usize = 16 << 20;
/// Fewest rows a chunk is cut to; its parts then have at least half as many.
/// Products of up to 11 rows came out differently in the last bits from the same
/// rows in a larger product (`feed_forward_chunks_change_no_bit`); from 14 rows on
/// they were the same.
const FF_MIN_ROWS: usize = 64;

/// diffusers' `FeedForward` with GEGLU: `net.0.proj`, GEGLU, `net.2`.
#[derive(Debug)]
struct FeedForward {
    project_in: Linear,
    project_out: Linear,
    /// The two products' time, for `kiln bench pipeline --profile`.
    span: tracing::Span,
    /// The GEGLU's time.
    geglu_span: tracing::Span,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            project_in: linear::linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            project_out: linear::linear(inner, dim, vb.pp("net.2"))?,
            span: tracing::trace_span!("feed-forward"),
            geglu_span: tracing::trace_span!("geglu"),
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        match xs.device().is_cpu() {
            true => {
                let row_bytes = self.project_in.out_features() * xs.dtype().size_in_bytes();
                self.forward_in_chunks(xs, (FF_CHUNK_BYTES / row_bytes.max(1)).max(1))
            }
            false => self.forward_rows(xs),
        }
    }

    /// [`FeedForward::forward`] on at most `chunk` rows (tokens of all batch rows) at
    /// a time, joined. Each output row depends on its input row alone, and the parts'
    /// sizes differ by at most one row and are at least half of [`FF_MIN_ROWS`] (the
    /// products of a few rows that `gemm` sums in another order never occur), so the
    /// chunk size changes no bit.
    fn forward_in_chunks(&self, xs: &Tensor, chunk: usize) -> candle_core::Result<Tensor> {
        let width = xs.dim(candle_core::D::Minus1)?;
        let rows = xs.elem_count() / width.max(1);
        if rows <= chunk {
            return self.forward_rows(xs);
        }
        let parts = rows.div_ceil(chunk.max(FF_MIN_ROWS));
        // The first `rows % parts` parts take one row more than the others.
        let (size, longer) = (rows / parts, rows % parts);
        let flat = xs.reshape((rows, width))?;
        let mut start = 0;
        let mut outputs = Vec::with_capacity(parts);
        for part in 0..parts {
            let len = size + usize::from(part < longer);
            outputs.push(self.forward_rows(&flat.narrow(0, start, len)?)?);
            start += len;
        }
        let mut dims = xs.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.project_out.out_features();
        }
        Tensor::cat(&outputs, 0)?.reshape(dims)
    }

    fn forward_rows(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let projected = self.project_in.forward(xs)?;
        let gated = {
            let _gating = self.geglu_span.enter();
            geglu::geglu(&projected)?
        };
        self.project_out.forward(&gated)
    }
}

/// diffusers' `BasicTransformerBlock`: self-attention, cross-attention, feed-forward,
/// each after a layer norm and added to its input.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(
                vb.pp("attn1"),
                dim,
                dim,
                heads,
                tracing::trace_span!("self-attention"),
            )?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                context_dim,
                heads,
                tracing::trace_span!("cross-attention"),
            )?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// A projection into or out of the transformer: a 1×1 convolution or a linear layer.
#[derive(Debug)]
enum Projection {
    Conv(Linear),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` (continuous input): group norm, projection in,
/// transformer blocks over the pixels as tokens, projection out, plus the input.
#[derive(Debug)]
pub(crate) struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
    span: tracing::Span,
}

/// Loads a 1×1 convolution (`weight` `[to, from, 1, 1]`, `bias`) as the linear layer
/// it is on tokens.
fn conv1x1(vb: VarBuilder, from: usize, to: usize) -> candle_core::Result<Linear> {
    let weight = vb.get((to, from, 1, 1), "weight")?.reshape((to, from))?;
    Linear::new(weight, Some(vb.get(to, "bias")?))
}

/// Loads a linear layer stored either as `[to, from]` or, in older checkpoints, as a
/// 1×1 convolution, with a bias.
fn linear_or_conv1x1(vb: VarBuilder, from: usize, to: usize) -> candle_core::Result<Linear> {
    match vb.get((to, from), "weight") {
        Ok(_) => linear::linear(from, to, vb),
        Err(_) => conv1x1(vb, from, to),
    }
}

impl Transformer2D {
    /// Loads `attentions.{j}` over `channels` channels.
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        c: TransformerConfig,
    ) -> candle_core::Result<Self> {
        // diffusers stores the projections as the layer kind the config names.
        let projection = |name: &str| -> candle_core::Result<Projection> {
            Ok(match c.use_linear_projection {
                true => Projection::Linear(linear::linear(channels, channels, vb.pp(name))?),
                false => Projection::Conv(conv1x1(vb.pp(name), channels, channels)?),
            })
        };
        let blocks = (0..c.depth)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    channels,
                    c.heads,
                    c.context_dim,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm::group_norm(c.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
            span: tracing::debug_span!("transformer"),
        })
    }

    /// Runs the block on `xs` `[batch, c, h, w]` with text states `context`.
    pub(crate) fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let (batch, channels, height, width) = xs.dims4()?;
        let tokens = self
            .norm
            .forward(xs)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        // A 1×1 convolution on the pixels is the same product as a linear layer on the
        // tokens (diffusers' two projection kinds differ only in where they transpose).
        let (Projection::Conv(proj_in) | Projection::Linear(proj_in)) = &self.proj_in;
        let mut tokens = proj_in.forward(&tokens)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let (Projection::Conv(proj_out) | Projection::Linear(proj_out)) = &self.proj_out;
        let out = proj_out
            .forward(&tokens)?
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        out + xs
    }
}

/// diffusers' `Attention` as the VAE's mid block uses it: group norm, attention (one
/// head over all channels in SD's VAEs), residual, divided by `rescale`.
#[derive(Debug)]
pub(crate) struct VaeAttention {
    norm: GroupNorm,
    attention: Attention,
    rescale: f64,
    span: tracing::Span,
}

impl VaeAttention {
    /// Loads `attentions.{i}` over `channels` channels: its group norm's groups and
    /// epsilon, the output's divisor and the heads.
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        (groups, eps, rescale, heads): (usize, f64, f64, usize),
    ) -> candle_core::Result<Self> {
        let names = match vb.contains_tensor("to_q.weight") {
            true => ["to_q", "to_k", "to_v", "to_out.0"],
            false => ["query", "key", "value", "proj_attn"],
        };
        let layer = |name: &str| linear_or_conv1x1(vb.pp(name), channels, channels);
        Ok(Self {
            norm: group_norm::group_norm(groups, channels, eps, vb.pp("group_norm"))?,
            attention: Attention {
                to_q: layer(names[0])?,
                to_k: layer(names[1])?,
                to_v: layer(names[2])?,
                to_out: layer(names[3])?,
                heads,
                scale: 1.0 / ((channels / heads.max(1)) as f64).sqrt(),
                span: tracing::trace_span!("vae-attention"),
                attend_span: tracing::trace_span!("attend"),
            },
            rescale,
            span: tracing::trace_span!("attn-block"),
        })
    }
}

impl Module for VaeAttention {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let (batch, channels, height, width) = xs.dims4()?;
        let tokens = self
            .norm
            .forward(xs)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        let out = self
            .attention
            .forward(&tokens, None)?
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        let out = (out + xs)?;
        match self.rescale {
            1.0 => Ok(out),
            factor => out / factor,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    use super::*;

    /// The feed-forward gives every row the same bits whatever the chunk size.
    #[test]
    fn feed_forward_chunks_change_no_bit() -> candle_core::Result<()> {
        let cpu = &Device::Cpu;
        for (dim, batch, tokens, chunks) in [
            (24, 2, 37, &[1, 5, 37, 73, 74][..]),
            (64, 2, 700, &[100, 250, 699, 1400][..]),
            // 4,033 rows in parts of at most 64: sizes 63 and 64 (parts of 64 rows
            // would leave one row alone).
            (8, 1, 4033, &[64][..]),
        ] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, cpu);
            let ff = FeedForward::new(vb.pp("ff"), dim)?;
            // VarMap's initial biases are zeros; give every weight some spread.
            for var in map.all_vars() {
                var.set(&Tensor::randn(0f32, 0.5, var.shape(), cpu)?)?;
            }
            let xs = Tensor::randn(0f32, 1., (batch, tokens, dim), cpu)?;
            let bits = |t: Tensor| -> candle_core::Result<Vec<u32>> {
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                Ok(values.into_iter().map(f32::to_bits).collect())
            };
            let whole = ff.forward_in_chunks(&xs, usize::MAX)?;
            assert_eq!(whole.dims(), &[batch, tokens, dim]);
            let whole = bits(whole)?;
            for &chunk in chunks {
                let got = bits(ff.forward_in_chunks(&xs, chunk)?)?;
                assert!(got == whole, "{batch}x{tokens}x{dim} in chunks of {chunk}");
            }
            assert!(bits(ff.forward(&xs)?)? == whole);
        }
        Ok(())
    }
}
