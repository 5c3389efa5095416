//! The ControlNet network: diffusers' `ControlNetModel`.
//!
//! A ControlNet is a copy of its base UNet's down half (time and SDXL added
//! embeddings, `conv_in`, down blocks, mid block, under the same tensor names,
//! built here by [`Unet::encoder`]) plus a small convolutional encoder of the
//! control image (`controlnet_cond_embedding`), whose output is added after
//! `conv_in`, and a 1×1 convolution per skip connection and one for the mid block
//! (`controlnet_down_blocks`, `controlnet_mid_block`; zero-initialised in
//! training). Its outputs, times the conditioning scale, are the residuals the
//! UNet adds to its skips and mid block.
//!
//! The down half is built from the *base* UNet's config, so a ControlNet made
//! for another base fails to load on the first tensor whose name or shape does
//! not fit, and that tensor is named.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::conv::{self, Conv2d};
use crate::unet::{Conditioning, Residuals, Unet, UnetConfig};

/// The architecture of a ControlNet beyond its base UNet's down half.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ControlNetConfig {
    /// The base UNet's config, with the latent channels as input.
    pub(crate) unet: UnetConfig,
    /// Channels of the control image (3).
    pub(crate) conditioning_channels: usize,
    /// Channels of the control-image encoder's levels (`conditioning_embedding_out_channels`).
    pub(crate) embedding_channels: Vec<usize>,
}

/// `controlnet_cond_embedding`: the control image → the UNet's first feature size.
#[derive(Debug)]
struct CondEmbedding {
    conv_in: Conv2d,
    /// Pairs of (3×3 conv, 3×3 stride-2 conv) per level step, flattened.
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

impl CondEmbedding {
    fn new(vb: VarBuilder, c: &ControlNetConfig, out_channels: usize) -> candle_core::Result<Self> {
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let down = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let ch = &c.embedding_channels;
        let (Some(&first), Some(&last)) = (ch.first(), ch.last()) else {
            return Err(candle_core::Error::Msg(
                "conditioning_embedding_out_channels is empty".into(),
            ));
        };
        let mut blocks = Vec::with_capacity(2 * ch.len());
        for (i, pair) in ch.windows(2).enumerate() {
            let vb = vb.pp("blocks");
            blocks.push(conv::conv2d(pair[0], pair[0], 3, same, vb.pp(2 * i))?);
            blocks.push(conv::conv2d(pair[0], pair[1], 3, down, vb.pp(2 * i + 1))?);
        }
        Ok(Self {
            conv_in: conv::conv2d(c.conditioning_channels, first, 3, same, vb.pp("conv_in"))?,
            blocks,
            conv_out: conv::conv2d(last, out_channels, 3, same, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = candle_nn::ops::silu(&self.conv_in.forward(image)?)?;
        for block in &self.blocks {
            xs = candle_nn::ops::silu(&block.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

/// A loaded ControlNet.
#[derive(Debug)]
pub(crate) struct ControlNet {
    /// The UNet's down half.
    encoder: Unet,
    cond_embedding: CondEmbedding,
    /// `controlnet_down_blocks.{i}`: one 1×1 conv per skip connection.
    down: Vec<Conv2d>,
    /// `controlnet_mid_block`.
    mid: Conv2d,
    span: tracing::Span,
}

impl ControlNet {
    /// Loads a ControlNet with diffusers' tensor names.
    pub(crate) fn new(vb: VarBuilder, c: &ControlNetConfig) -> candle_core::Result<Self> {
        let u = &c.unet;
        let (Some(first), Some(last)) = (u.blocks.first(), u.blocks.last()) else {
            return Err(candle_core::Error::Msg(
                "a ControlNet needs at least one block".into(),
            ));
        };
        let encoder = Unet::encoder(vb.clone(), u)?;
        let cond_embedding =
            CondEmbedding::new(vb.pp("controlnet_cond_embedding"), c, first.channels)?;
        // One residual per skip: conv_in's, each layer's, each downsampler's.
        let mut widths = vec![first.channels];
        for (i, block) in u.blocks.iter().enumerate() {
            widths.extend(std::iter::repeat_n(block.channels, u.layers_per_block));
            if i + 1 < u.blocks.len() {
                widths.push(block.channels);
            }
        }
        let one = Conv2dConfig::default();
        let down = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| conv::conv2d(w, w, 1, one, vb.pp("controlnet_down_blocks").pp(i)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = conv::conv2d(
            last.channels,
            last.channels,
            1,
            one,
            vb.pp("controlnet_mid_block"),
        )?;
        Ok(Self {
            encoder,
            cond_embedding,
            down,
            mid,
            span: tracing::debug_span!("controlnet"),
        })
    }

    /// Returns the residuals for `latents` `[batch, c, h, w]` at `timestep`, with the
    /// control images `image` `[batch, 3, H, W]` (in [0, 1], the render's pixel size)
    /// and `scale` `[batch, 1, 1, 1]` (each row's conditioning scale); `group` as in
    /// [`Unet::forward_tasks`]. `cond` must carry no image conditioning: a ControlNet
    /// takes the latents alone, also beside an inpainting UNet.
    pub(crate) fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        group: usize,
        image: &Tensor,
        scale: &Tensor,
    ) -> candle_core::Result<Residuals> {
        let _entered = self.span.enter();
        let hint = self.cond_embedding.forward(image)?;
        let (skips, mid, _) = self
            .encoder
            .encode(latents, timestep, cond, group, Some(&hint))?;
        if skips.len() != self.down.len() {
            return Err(candle_core::Error::Msg(format!(
                "the ControlNet made {} skips for {} zero convolutions",
                skips.len(),
                self.down.len()
            )));
        }
        let down = skips
            .iter()
            .zip(&self.down)
            .map(|(s, conv)| conv.forward(s)?.broadcast_mul(scale))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = self.mid.forward(&mid)?.broadcast_mul(scale)?;
        Ok(Residuals { down, mid })
    }
}
