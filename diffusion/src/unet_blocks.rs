//! The UNet's ResNet block and cross-attention mid block, owned by kiln so that
//! a batch of tasks gives every task the bytes it gets alone.
//!
//! A ResNet block projects the time embedding with a linear layer whose rows are
//! the batch (`time_emb_proj`). The CPU matrix-multiply kernels (the `gemm`
//! crate) pick their algorithm from the matrix sizes: one row goes through a
//! matrix-vector kernel, products of at most 256 outputs through a "horizontal"
//! kernel, larger ones through the blocked kernel; each sums in another order.
//! So the same row projected in a batch of 2 and in a batch of 8 can differ in
//! the last bit (measured: up to 1e-6 on the tiny model's time embedding), and
//! the difference grows over the steps. [`ResnetBlock::forward`] therefore
//! projects the time embedding one task (`group` rows) at a time, exactly as a
//! render of that task alone does. Everything else in the block works per batch
//! row already (group norm per sample, convolutions per image).
//!
//! The arithmetic follows candle's `ResnetBlock2D` and `UNetMidBlock2DCrossAttn`
//! (diffusers' `ResnetBlock2D` and `UNetMidBlock2DCrossAttn`) operation for
//! operation, so a single task renders the bytes candle's blocks gave it; the
//! tensor names are diffusers'.

use super::conv::{self, Conv2d};
use super::group_norm::{self, GroupNorm};
use super::linear::{self, Linear};
use super::transformer::{Transformer2D, TransformerConfig};
use candle_core::{D, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// Group norm settings shared by a UNet's blocks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Norm {
    /// Groups of every group norm.
    pub(crate) groups: usize,
    /// Epsilon of every group norm.
    pub(crate) eps: f64,
}

/// Returns `rows` split into consecutive groups of `group` rows, each passed through `f`,
/// concatenated again: a batch computed task by task.
pub(crate) fn per_group(
    rows: &Tensor,
    group: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let batch = rows.dim(0)?;
    if group == 0 || !batch.is_multiple_of(group) {
        return Err(candle_core::Error::Msg(format!(
            "a batch of {batch} rows does not split into tasks of {group}"
        )));
    }
    if batch == group {
        return f(rows);
    }
    let parts = (0..batch / group)
        .map(|g| f(&rows.narrow(0, g * group, group)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// A ResNet block, with time conditioning in the UNet and without in the VAE
/// (diffusers' `ResnetBlock2D`).
#[derive(Debug)]
pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    /// Projects the time embedding to this block's channels (none in the VAE).
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    /// A 1×1 convolution when the block changes the channel count.
    conv_shortcut: Option<Conv2d>,
    /// The output is divided by this (1 except in some mid blocks).
    output_scale_factor: f64,
    span: tracing::Span,
}

impl ResnetBlock {
    /// Loads `resnets.{j}` mapping `in_channels` to `out_channels`.
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        norm: Norm,
        output_scale_factor: f64,
    ) -> candle_core::Result<Self> {
        let time_emb_proj = temb_channels
            .map(|t| linear::linear(t, out_channels, vb.pp("time_emb_proj")))
            .transpose()?;
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_shortcut = if in_channels != out_channels {
            Some(conv::conv2d(
                in_channels,
                out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm::group_norm(norm.groups, in_channels, norm.eps, vb.pp("norm1"))?,
            conv1: conv::conv2d(in_channels, out_channels, 3, conv3, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm::group_norm(norm.groups, out_channels, norm.eps, vb.pp("norm2"))?,
            conv2: conv::conv2d(out_channels, out_channels, 3, conv3, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor,
            span: tracing::debug_span!("resnet"),
        })
    }

    /// Runs the block on `xs` `[batch, c, h, w]` with the time embedding `temb`
    /// `[batch, temb]` (when the block has a projection), projecting `temb` one
    /// task of `group` rows at a time.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        group: usize,
    ) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = per_group(&candle_nn::ops::silu(temb)?, group, |rows| {
                    proj.forward(rows)
                })?;
                t.unsqueeze(D::Minus1)?
                    .unsqueeze(D::Minus1)?
                    .broadcast_add(&h)?
            }
            (None, None) => h,
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "this ResNet block needs a time embedding".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(candle_core::Error::Msg(
                    "this ResNet block takes no time embedding".into(),
                ));
            }
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let out = (shortcut + h)?;
        // Dividing by 1 (every SD block but some mid blocks) is a copy: skip it.
        match self.output_scale_factor {
            1.0 => Ok(out),
            factor => out / factor,
        }
    }
}

/// The mid block: a ResNet, then (cross-attention, ResNet) once (diffusers'
/// `UNetMidBlock2DCrossAttn` with one layer, as every SD UNet has).
#[derive(Debug)]
pub(crate) struct MidBlock {
    /// `resnets.0`.
    first: ResnetBlock,
    /// `attentions.0`.
    attention: Transformer2D,
    /// `resnets.1`.
    second: ResnetBlock,
}

/// The mid block's attention.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MidAttention {
    /// Attention heads.
    pub(crate) heads: usize,
    /// Transformer layers.
    pub(crate) layers: usize,
    /// Width of the text states.
    pub(crate) cross_attention_dim: usize,
    /// Linear rather than 1×1-conv projections around attention.
    pub(crate) use_linear_projection: bool,
}

impl MidBlock {
    /// Loads `mid_block` over `channels` channels.
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        temb_channels: usize,
        norm: Norm,
        attention: MidAttention,
        output_scale_factor: f64,
    ) -> candle_core::Result<Self> {
        let resnet = |j: usize| {
            ResnetBlock::new(
                vb.pp("resnets").pp(j),
                channels,
                channels,
                Some(temb_channels),
                norm,
                output_scale_factor,
            )
        };
        let attention = Transformer2D::new(
            vb.pp("attentions").pp(0),
            channels,
            TransformerConfig {
                heads: attention.heads,
                depth: attention.layers,
                groups: norm.groups,
                context_dim: attention.cross_attention_dim,
                use_linear_projection: attention.use_linear_projection,
            },
        )?;
        Ok(Self {
            first: resnet(0)?,
            attention,
            second: resnet(1)?,
        })
    }

    /// Runs the block; `group` as in [`ResnetBlock::forward`].
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        group: usize,
    ) -> candle_core::Result<Tensor> {
        let xs = self.first.forward(xs, Some(temb), group)?;
        let xs = self.attention.forward(&xs, context)?;
        self.second.forward(&xs, Some(temb), group)
    }
}
