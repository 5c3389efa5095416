//! kiln's VAE: candle's encoder and decoder blocks under a top level that can
//! return the latent distribution's mean.
//!
//! candle's `AutoEncoderKL::encode` returns a `DiagonalGaussianDistribution`
//! whose mean is private and whose only use is `sample()`, which draws from the
//! device generator (unseedable on the CPU): an img2img render through it could
//! never reproduce. kiln therefore assembles the same network from its own
//! blocks (`vae_blocks`, candle's on kiln's convolution), operation for
//! operation as `AutoEncoderKL` does, and [`Vae::encode`] returns
//! the mean, as diffusers' `retrieve_latents(.., sample_mode="argmax")` does.
//! Tensor names are diffusers'.
//!
//! Use batches of one image: candle 0.11.1's CPU matrix multiply folds a batch
//! into one product when the right operand is shared (a linear layer's weight)
//! without checking that the left operand's rows are contiguous, and the VAE's
//! attention feeds it transposed rows, so images after the first come out wrong.
//! The pipeline encodes and decodes image by image.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2DConfig, UNetMidBlock2DConfig, UpDecoderBlock2DConfig,
};

use super::config::VaeSpec;
use super::conv::{self, Conv2d};
use super::group_norm::{self, GroupNorm};
use super::vae_blocks::{DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D};

/// The epsilon of every group norm in SD's VAE (fixed in diffusers' `Encoder`/`Decoder`).
const EPS: f64 = 1e-6;

/// Images → latent means, latents → images.
#[derive(Debug)]
pub(crate) struct Vae {
    /// `encoder.*`.
    encoder: Encoder,
    /// `decoder.*`.
    decoder: Decoder,
    /// `quant_conv`: the encoder's moments → moments.
    quant_conv: Option<Conv2d>,
    /// `post_quant_conv`: latents → the decoder's input.
    post_quant_conv: Option<Conv2d>,
    /// Channels of the latents (half of the encoder's moments).
    latent_channels: usize,
}

/// diffusers' `Encoder`: image → moments (mean and log variance of the latents).
#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// diffusers' `Decoder`: latents → image.
#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// A 3×3 convolution with padding 1.
fn conv3(vb: VarBuilder, from: usize, to: usize) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv::conv2d(from, to, 3, cfg, vb)
}

/// The mid block's config: one ResNet-attention-ResNet, one head.
fn mid_config(groups: usize) -> UNetMidBlock2DConfig {
    UNetMidBlock2DConfig {
        resnet_eps: EPS,
        output_scale_factor: 1.,
        attn_num_head_channels: None,
        resnet_groups: Some(groups),
        ..Default::default()
    }
}

impl Vae {
    /// Loads `encoder.*`, `decoder.*`, `quant_conv` and `post_quant_conv`.
    pub(crate) fn new(vb: VarBuilder, spec: &VaeSpec) -> candle_core::Result<Self> {
        let c = &spec.config;
        let (Some(&first), Some(&last)) =
            (c.block_out_channels.first(), c.block_out_channels.last())
        else {
            return Err(candle_core::Error::Msg(
                "a VAE needs at least one block".into(),
            ));
        };
        let n = c.block_out_channels.len();
        let groups = c.norm_num_groups;
        let latent = c.latent_channels;

        let enc = vb.pp("encoder");
        let mut down_blocks = Vec::with_capacity(n);
        for (i, &out) in c.block_out_channels.iter().enumerate() {
            let from = if i > 0 {
                c.block_out_channels[i - 1]
            } else {
                first
            };
            let cfg = DownEncoderBlock2DConfig {
                num_layers: c.layers_per_block,
                resnet_eps: EPS,
                resnet_groups: groups,
                add_downsample: i + 1 < n,
                downsample_padding: 0,
                ..Default::default()
            };
            down_blocks.push(DownEncoderBlock2D::new(
                enc.pp("down_blocks").pp(i),
                from,
                out,
                cfg,
            )?);
        }
        let encoder = Encoder {
            conv_in: conv3(enc.pp("conv_in"), spec.in_channels, first)?,
            down_blocks,
            mid_block: UNetMidBlock2D::new(enc.pp("mid_block"), last, None, mid_config(groups))?,
            conv_norm_out: group_norm::group_norm(groups, last, EPS, enc.pp("conv_norm_out"))?,
            conv_out: conv3(enc.pp("conv_out"), last, 2 * latent)?,
        };

        let dec = vb.pp("decoder");
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        for (i, &out) in reversed.iter().enumerate() {
            let from = if i > 0 { reversed[i - 1] } else { reversed[0] };
            let cfg = UpDecoderBlock2DConfig {
                num_layers: c.layers_per_block + 1,
                resnet_eps: EPS,
                resnet_groups: groups,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            up_blocks.push(UpDecoderBlock2D::new(
                dec.pp("up_blocks").pp(i),
                from,
                out,
                cfg,
            )?);
        }
        let decoder = Decoder {
            conv_in: conv3(dec.pp("conv_in"), latent, last)?,
            mid_block: UNetMidBlock2D::new(dec.pp("mid_block"), last, None, mid_config(groups))?,
            up_blocks,
            conv_norm_out: group_norm::group_norm(groups, first, EPS, dec.pp("conv_norm_out"))?,
            conv_out: conv3(dec.pp("conv_out"), first, spec.out_channels)?,
        };

        let conv1 = |vb: VarBuilder, channels: usize| {
            conv::conv2d(channels, channels, 1, Conv2dConfig::default(), vb)
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv: match c.use_quant_conv {
                true => Some(conv1(vb.pp("quant_conv"), 2 * latent)?),
                false => None,
            },
            post_quant_conv: match c.use_post_quant_conv {
                true => Some(conv1(vb.pp("post_quant_conv"), latent)?),
                false => None,
            },
            latent_channels: latent,
        })
    }

    /// Returns the mean of the latent distribution of `images` (`[1, 3, h, w]` in
    /// [-1, 1]), unscaled: `[1, latent channels, h / 8, w / 8]`.
    pub(crate) fn encode(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let e = &self.encoder;
        let mut xs = e.conv_in.forward(images)?;
        for block in &e.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = e.mid_block.forward(&xs, None)?;
        let xs = e.conv_norm_out.forward_silu(&xs)?;
        let moments = e.conv_out.forward(&xs)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        // The moments are (mean, log variance) along the channels.
        moments.narrow(1, 0, self.latent_channels)?.contiguous()
    }

    /// Decodes unscaled latents `[1, latent channels, h, w]` to images in about [-1, 1].
    pub(crate) fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let xs = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        let d = &self.decoder;
        let mut xs = d.mid_block.forward(&d.conv_in.forward(&xs)?, None)?;
        for block in &d.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = d.conv_norm_out.forward_silu(&xs)?;
        d.conv_out.forward(&xs)
    }
}
