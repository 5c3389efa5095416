//! The VAE's blocks on kiln's convolution, in place of candle's.
//!
//! Convolutions are most of an SD-1.5 VAE decode on the CPU (`kiln bench
//! pipeline --profile`), and candle's blocks keep theirs private, so kiln owns
//! the blocks: [`DownEncoderBlock2D`], [`UNetMidBlock2D`] and
//! [`UpDecoderBlock2D`] take candle's config types and diffusers' tensor names
//! and run candle's operations in candle's order (diffusers'
//! `unet_2d_blocks.py`), on [`ResnetBlock`] (without time conditioning) and
//! [`conv::Conv2d`]. The mid block's attention is kiln's [`VaeAttention`].

use candle_core::{D, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2DConfig, UNetMidBlock2DConfig, UpDecoderBlock2DConfig,
};

use super::conv::{self, Conv2d};
use super::transformer::VaeAttention;
use super::unet_blocks::{Norm, ResnetBlock};

/// A 3×3 convolution with padding 1.
fn conv3(vb: VarBuilder, from: usize, to: usize) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv::conv2d(from, to, 3, cfg, vb)
}

/// `count` ResNets without time conditioning: the first from `in_channels`, all to `out_channels`.
fn resnets(
    vb: VarBuilder,
    count: usize,
    in_channels: usize,
    out_channels: usize,
    (groups, eps, output_scale_factor): (usize, f64, f64),
) -> candle_core::Result<Vec<ResnetBlock>> {
    let norm = Norm { groups, eps };
    (0..count)
        .map(|i| {
            let from = if i == 0 { in_channels } else { out_channels };
            ResnetBlock::new(
                vb.pp("resnets").pp(i),
                from,
                out_channels,
                None,
                norm,
                output_scale_factor,
            )
        })
        .collect()
}

/// Runs `xs` through `resnets` in order.
fn through(resnets: &[ResnetBlock], xs: &Tensor) -> candle_core::Result<Tensor> {
    let mut xs = xs.clone();
    for resnet in resnets {
        xs = resnet.forward(&xs, None, 1)?;
    }
    Ok(xs)
}

/// diffusers' `DownEncoderBlock2D`: ResNets, then a stride-2 convolution.
#[derive(Debug)]
pub(crate) struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock>,
    /// `downsamplers.0.conv`, and whether it pads right and bottom itself (padding 0).
    downsampler: Option<(Conv2d, bool)>,
    span: tracing::Span,
}

impl DownEncoderBlock2D {
    /// Loads `resnets.*` and `downsamplers.0.conv`.
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        c: DownEncoderBlock2DConfig,
    ) -> candle_core::Result<Self> {
        let resnets = resnets(
            vb.clone(),
            c.num_layers,
            in_channels,
            out_channels,
            (c.resnet_groups, c.resnet_eps, c.output_scale_factor),
        )?;
        let downsampler = if c.add_downsample {
            let cfg = Conv2dConfig {
                stride: 2,
                padding: c.downsample_padding,
                ..Default::default()
            };
            let conv = conv::conv2d(
                out_channels,
                out_channels,
                3,
                cfg,
                vb.pp("downsamplers").pp(0).pp("conv"),
            )?;
            Some((conv, c.downsample_padding == 0))
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsampler,
            span: tracing::trace_span!("down-enc2d"),
        })
    }
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let xs = through(&self.resnets, xs)?;
        match &self.downsampler {
            Some((conv, true)) => conv.forward(
                &xs.pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?,
            ),
            Some((conv, false)) => conv.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: ResNets, then 2× nearest upsampling and a convolution.
#[derive(Debug)]
pub(crate) struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock>,
    /// `upsamplers.0.conv`.
    upsampler: Option<Conv2d>,
    span: tracing::Span,
}

impl UpDecoderBlock2D {
    /// Loads `resnets.*` and `upsamplers.0.conv`.
    pub(crate) fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        c: UpDecoderBlock2DConfig,
    ) -> candle_core::Result<Self> {
        let resnets = resnets(
            vb.clone(),
            c.num_layers,
            in_channels,
            out_channels,
            (c.resnet_groups, c.resnet_eps, c.output_scale_factor),
        )?;
        let upsampler = if c.add_upsample {
            Some(conv3(
                vb.pp("upsamplers").pp(0).pp("conv"),
                out_channels,
                out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            upsampler,
            span: tracing::trace_span!("up-dec2d"),
        })
    }
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let xs = through(&self.resnets, xs)?;
        match &self.upsampler {
            Some(conv) => conv.forward_upsampled(&xs),
            None => Ok(xs),
        }
    }
}

/// diffusers' `UNetMidBlock2D`: a ResNet, then (self-attention, ResNet) pairs.
#[derive(Debug)]
pub(crate) struct UNetMidBlock2D {
    resnet: ResnetBlock,
    attn_resnets: Vec<(VaeAttention, ResnetBlock)>,
    span: tracing::Span,
}

impl UNetMidBlock2D {
    /// Loads `resnets.*` and `attentions.*`.
    pub(crate) fn new(
        vb: VarBuilder,
        channels: usize,
        temb_channels: Option<usize>,
        c: UNetMidBlock2DConfig,
    ) -> candle_core::Result<Self> {
        let groups = c.resnet_groups.unwrap_or((channels / 4).min(32));
        let norm = Norm {
            groups,
            eps: c.resnet_eps,
        };
        let resnet = |j: usize| {
            ResnetBlock::new(
                vb.pp("resnets").pp(j),
                channels,
                channels,
                temb_channels,
                norm,
                c.output_scale_factor,
            )
        };
        let heads = channels / c.attn_num_head_channels.unwrap_or(channels).max(1);
        let attention = (groups, c.resnet_eps, c.output_scale_factor, heads);
        let first = resnet(0)?;
        let attn_resnets = (0..c.num_layers)
            .map(|i| {
                let attn = VaeAttention::new(vb.pp("attentions").pp(i), channels, attention)?;
                let res = resnet(i + 1)?;
                Ok((attn, res))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            resnet: first,
            attn_resnets,
            span: tracing::trace_span!("mid2d"),
        })
    }

    /// Runs the block, with the time embedding when the ResNets take one.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let mut xs = self.resnet.forward(xs, temb, 1)?;
        for (attn, resnet) in &self.attn_resnets {
            xs = resnet.forward(&attn.forward(&xs)?, temb, 1)?;
        }
        Ok(xs)
    }
}
