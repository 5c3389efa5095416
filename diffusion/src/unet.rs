//! kiln's UNet: the top level of diffusers' `UNet2DConditionModel`, built from candle's parts.
//!
//! candle's `UNet2DConditionModel` cannot run SDXL: it has no added
//! conditioning (the pooled text embedding and the size/crop time ids that
//! `addition_embed_type = "text_time"` adds to the time embedding) and loads
//! without asking for those weights, so SDXL would render with them silently
//! ignored. Its down and up blocks also build their ResNets with 32 norm groups
//! whatever `norm_num_groups` says. So kiln owns the top level and the
//! down/up blocks (a few dozen lines each, following diffusers'
//! `unet_2d_condition.py` and `unet_2d_blocks.py`), the ResNet and mid blocks
//! (`unet_blocks`), every convolution (`conv`: candle's CPU convolution
//! re-lays its weights out on every call) and the attention blocks
//! (`transformer`: attention without a score matrix, exact GELU), and reuses
//! candle's `Timesteps` and `TimestepEmbedding` unchanged. Tensor names are diffusers'.
//!
//! Inputs beyond the noisy latents travel in a [`Conditioning`]: the text
//! states for cross-attention, SDXL's added conditioning, and for inpainting
//! UNets (`in_channels = 9`) the mask and masked-image latents that are
//! concatenated to the latents, as diffusers' inpainting pipelines do.

use candle_core::{D, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};

use super::conv::{self, Conv2d};
use super::group_norm::{self, GroupNorm};
use super::transformer::{Transformer2D, TransformerConfig};
use super::unet_blocks::{MidAttention, MidBlock, Norm, ResnetBlock, per_group};

/// Cross-attention of one block: heads and transformer layers per attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CrossAttention {
    /// Attention heads (diffusers' `attention_head_dim`, a legacy misnomer).
    pub(crate) heads: usize,
    /// `BasicTransformerBlock`s per `Transformer2DModel` (`transformer_layers_per_block`).
    pub(crate) layers: usize,
}

/// One resolution level of the UNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UnetBlock {
    /// Channels of this level.
    pub(crate) channels: usize,
    /// Cross-attention after each ResNet (`CrossAttn*Block2D`), or none (`*Block2D`).
    pub(crate) attention: Option<CrossAttention>,
}

/// SDXL's added conditioning (`addition_embed_type = "text_time"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TextTime {
    /// Sinusoidal channels per time id (`addition_time_embed_dim`, 256 for SDXL).
    pub(crate) time_embed_dim: usize,
    /// Input width of `add_embedding` (`projection_class_embeddings_input_dim`):
    /// pooled text width + 6 time ids × `time_embed_dim`.
    pub(crate) input_dim: usize,
}

/// The architecture of a UNet, read from `unet/config.json`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct UnetConfig {
    /// Channels in: the latents, plus mask and masked-image latents for inpainting.
    pub(crate) in_channels: usize,
    /// Channels out: the latents.
    pub(crate) out_channels: usize,
    /// Levels from the finest to the coarsest.
    pub(crate) blocks: Vec<UnetBlock>,
    /// ResNets per down block (up blocks have one more).
    pub(crate) layers_per_block: usize,
    /// The mid block's attention.
    pub(crate) mid_attention: CrossAttention,
    /// Width of the text states the cross-attention reads.
    pub(crate) cross_attention_dim: usize,
    /// Linear rather than 1×1-conv projections around attention (SD 2.x, SDXL).
    pub(crate) use_linear_projection: bool,
    /// Groups of every group norm.
    pub(crate) norm_num_groups: usize,
    /// Epsilon of the ResNets' and the output's group norms.
    pub(crate) norm_eps: f64,
    /// Sinusoidal embedding order: cos first when true.
    pub(crate) flip_sin_to_cos: bool,
    /// Sinusoidal embedding frequency shift.
    pub(crate) freq_shift: f64,
    /// Padding of the downsampling convolutions (0 pads right/bottom by one instead).
    pub(crate) downsample_padding: usize,
    /// The mid block's output scale.
    pub(crate) mid_block_scale_factor: f64,
    /// Maps the input from [0, 1] to [-1, 1] first.
    pub(crate) center_input_sample: bool,
    /// SDXL's added conditioning, when the UNet has one.
    pub(crate) text_time: Option<TextTime>,
}

/// SDXL's added conditioning for a batch: pooled text embedding and time ids.
#[derive(Clone, Debug)]
pub(crate) struct AddedConditioning {
    /// `[batch, projection_dim]`: the second text encoder's projected pooled output.
    pub(crate) text_embeds: Tensor,
    /// `[batch, 6]`: original height, width, crop top, left, target height, width (pixels).
    pub(crate) time_ids: Tensor,
}

/// Everything the UNet is conditioned on besides the noisy latents and the timestep.
#[derive(Clone, Debug)]
pub(crate) struct Conditioning {
    /// `[batch, tokens, cross_attention_dim]`: text states for cross-attention.
    pub(crate) context: Tensor,
    /// SDXL's added conditioning; required exactly when the UNet has `add_embedding`.
    pub(crate) added: Option<AddedConditioning>,
    /// `[batch, 1 + latent channels, h, w]`: mask then masked-image latents, concatenated
    /// to the latents; required exactly by inpainting UNets.
    pub(crate) image: Option<Tensor>,
}

/// A down block: ResNets, each optionally followed by attention, then a downsampler.
#[derive(Debug)]
struct DownBlock {
    /// `resnets.{j}`, built with the config's group count (candle's blocks use 32).
    resnets: Vec<ResnetBlock>,
    /// `attentions.{j}`, one per ResNet; empty for a `DownBlock2D`.
    attentions: Vec<Transformer2D>,
    /// Stride-2 convolution and whether it pads right/bottom itself (padding 0).
    downsampler: Option<(Conv2d, bool)>,
}

/// An up block: ResNets over (input ++ skip), each optionally followed by attention,
/// then a nearest-neighbour upsampler and a convolution.
#[derive(Debug)]
struct UpBlock {
    /// `resnets.{j}`: one more than a down block has, to take the downsampler's skip too.
    resnets: Vec<ResnetBlock>,
    /// `attentions.{j}`, one per ResNet; empty for an `UpBlock2D`.
    attentions: Vec<Transformer2D>,
    /// `upsamplers.0.conv`, after nearest-neighbour upsampling; none at the finest level.
    upsampler: Option<Conv2d>,
}

/// SDXL's `add_time_proj` and `add_embedding`.
#[derive(Debug)]
struct TextTimeEmbedding {
    /// `add_time_proj`: sinusoidal embedding of each time id (no weights).
    time_proj: Timesteps,
    /// `add_embedding.linear_1`, SiLU, `add_embedding.linear_2`.
    embedding: TimestepEmbedding,
}

/// The denoiser.
#[derive(Debug)]
pub(crate) struct Unet {
    /// Channels `forward` expects after appending the image conditioning.
    in_channels: usize,
    /// Resolution levels (down blocks).
    levels: usize,
    /// The fewest channels of any level: the narrowest attention projections.
    min_channels: usize,
    /// Maps the input to [-1, 1] first (no SD model does).
    center_input_sample: bool,
    /// `conv_in`.
    conv_in: Conv2d,
    /// `time_proj`: sinusoidal timestep embedding (no weights).
    time_proj: Timesteps,
    /// `time_embedding.linear_1/linear_2`.
    time_embedding: TimestepEmbedding,
    /// SDXL's added conditioning, added to the time embedding.
    text_time: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    /// Empty in an encoder ([`Unet::encoder`]).
    up_blocks: Vec<UpBlock>,
    /// `conv_norm_out` and `conv_out`; none in an encoder.
    out: Option<(GroupNorm, Conv2d)>,
    span: tracing::Span,
}

/// What a ControlNet adds to the UNet: diffusers' `down_block_additional_residuals`
/// (one per skip connection, in the order the down blocks make them) and
/// `mid_block_additional_residual`.
#[derive(Clone, Debug)]
pub(crate) struct Residuals {
    /// Added to the skip connections.
    pub(crate) down: Vec<Tensor>,
    /// Added to the mid block's output.
    pub(crate) mid: Tensor,
}

/// A 3×3 convolution with padding 1.
fn conv3(vb: VarBuilder, from: usize, to: usize) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv::conv2d(from, to, 3, cfg, vb)
}

impl Unet {
    /// Loads a UNet with diffusers' tensor names.
    pub(crate) fn new(vb: VarBuilder, c: &UnetConfig) -> candle_core::Result<Self> {
        Self::build(vb, c, true)
    }

    /// Loads the down half of a UNet (time and added embeddings, `conv_in`, down
    /// blocks, mid block), as a ControlNet holds it under the same tensor names.
    pub(crate) fn encoder(vb: VarBuilder, c: &UnetConfig) -> candle_core::Result<Self> {
        Self::build(vb, c, false)
    }

    /// Loads the whole UNet, or without `up_blocks` and the output layers.
    fn build(vb: VarBuilder, c: &UnetConfig, full: bool) -> candle_core::Result<Self> {
        let n = c.blocks.len();
        let (Some(first), Some(last)) = (c.blocks.first(), c.blocks.last()) else {
            return Err(candle_core::Error::Msg(
                "a UNet needs at least one block".into(),
            ));
        };
        let ch0 = first.channels;
        let temb = ch0 * 4;
        let norm = Norm {
            groups: c.norm_num_groups,
            eps: c.norm_eps,
        };
        let resnet = |vb: VarBuilder, from: usize, to: usize| {
            ResnetBlock::new(vb, from, to, Some(temb), norm, 1.0)
        };
        let attention = |vb: VarBuilder, channels: usize, a: CrossAttention| {
            Transformer2D::new(
                vb,
                channels,
                TransformerConfig {
                    heads: a.heads,
                    depth: a.layers,
                    groups: c.norm_num_groups,
                    context_dim: c.cross_attention_dim,
                    use_linear_projection: c.use_linear_projection,
                },
            )
        };

        let text_time = match c.text_time {
            Some(tt) => Some(TextTimeEmbedding {
                time_proj: Timesteps::new(tt.time_embed_dim, c.flip_sin_to_cos, c.freq_shift),
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), tt.input_dim, temb)?,
            }),
            None => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        for (i, block) in c.blocks.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let mut in_ch = if i == 0 {
                ch0
            } else {
                c.blocks[i - 1].channels
            };
            let mut resnets = Vec::with_capacity(c.layers_per_block);
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block {
                resnets.push(resnet(vb.pp("resnets").pp(j), in_ch, block.channels)?);
                if let Some(a) = block.attention {
                    attentions.push(attention(vb.pp("attentions").pp(j), block.channels, a)?);
                }
                in_ch = block.channels;
            }
            let downsampler = if i + 1 < n {
                let cfg = Conv2dConfig {
                    stride: 2,
                    padding: c.downsample_padding,
                    ..Default::default()
                };
                let conv = conv::conv2d(
                    block.channels,
                    block.channels,
                    3,
                    cfg,
                    vb.pp("downsamplers.0.conv"),
                )?;
                Some((conv, c.downsample_padding == 0))
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            last.channels,
            temb,
            norm,
            MidAttention {
                heads: c.mid_attention.heads,
                layers: c.mid_attention.layers,
                cross_attention_dim: c.cross_attention_dim,
                use_linear_projection: c.use_linear_projection,
            },
            c.mid_block_scale_factor,
        )?;

        // Up block i mirrors down block k = n - 1 - i. Its last ResNet takes the skip
        // from the level above (diffusers' `input_channel`), the others skips of its own width.
        let mut up_blocks = Vec::with_capacity(n);
        for i in (0..n).filter(|_| full) {
            let k = n - 1 - i;
            let block = c.blocks[k];
            let vb = vb.pp("up_blocks").pp(i);
            let prev_out = c.blocks[(k + 1).min(n - 1)].channels;
            let skip_last = c.blocks[k.saturating_sub(1)].channels;
            let layers = c.layers_per_block + 1;
            let mut resnets = Vec::with_capacity(layers);
            let mut attentions = Vec::new();
            for j in 0..layers {
                let res_in = if j == 0 { prev_out } else { block.channels };
                let skip = if j + 1 == layers {
                    skip_last
                } else {
                    block.channels
                };
                resnets.push(resnet(
                    vb.pp("resnets").pp(j),
                    res_in + skip,
                    block.channels,
                )?);
                if let Some(a) = block.attention {
                    attentions.push(attention(vb.pp("attentions").pp(j), block.channels, a)?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(conv3(
                    vb.pp("upsamplers.0.conv"),
                    block.channels,
                    block.channels,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            in_channels: c.in_channels,
            levels: n,
            min_channels: c.blocks.iter().map(|b| b.channels).min().unwrap_or(ch0),
            center_input_sample: c.center_input_sample,
            conv_in: conv3(vb.pp("conv_in"), c.in_channels, ch0)?,
            time_proj: Timesteps::new(ch0, c.flip_sin_to_cos, c.freq_shift),
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), ch0, temb)?,
            text_time,
            down_blocks,
            mid_block,
            up_blocks,
            out: if full {
                Some((
                    group_norm::group_norm(
                        c.norm_num_groups,
                        ch0,
                        c.norm_eps,
                        vb.pp("conv_norm_out"),
                    )?,
                    conv3(vb.pp("conv_out"), ch0, c.out_channels)?,
                ))
            } else {
                None
            },
            span: tracing::debug_span!("unet"),
        })
    }

    /// Returns whether tasks of this latent size give the same bytes batched as alone.
    ///
    /// The attention projections multiply `tasks × rows × tokens` rows by the
    /// channels. The CPU kernels sum in one order for all such products except the
    /// small ones: a single row, or at most 256 outputs, have kernels of their own.
    /// So a task alone must already be past those sizes at the coarsest level (the
    /// fewest tokens): two tokens or more, and more than 256 outputs with the fewest
    /// channels. Every SD model at 256 px and up is; the tiny models at 64 px are.
    pub(crate) fn batches_exactly(&self, latent_height: usize, latent_width: usize) -> bool {
        // Each downsampler halves a side (rounding down when it pads itself).
        let shift = self.levels.saturating_sub(1);
        let tokens = (latent_height >> shift) * (latent_width >> shift);
        tokens >= 2 && tokens * self.min_channels > 256
    }

    /// Predicts the noise (or v, or x0) for `latents` `[batch, c, h, w]` at `timestep`,
    /// the whole batch being one task (as [`Unet::forward_tasks`] with `group = batch`).
    ///
    /// # Errors
    ///
    /// As [`Unet::forward_tasks`].
    #[cfg(test)]
    pub(crate) fn forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
    ) -> candle_core::Result<Tensor> {
        self.forward_tasks(latents, timestep, cond, latents.dim(0)?)
    }

    /// Predicts the noise (or v, or x0) for `latents` `[batch, c, h, w]` at `timestep`,
    /// the batch being consecutive tasks of `group` rows each (1, or 2 with guidance).
    ///
    /// The per-row vector layers (time embedding, SDXL's added embedding, each ResNet's
    /// time projection) run one task at a time, so each task's rows come out with the
    /// bytes a batch of that task alone gives (see `unet_blocks`).
    ///
    /// # Errors
    ///
    /// A candle error when the conditioning does not fit the UNet (added conditioning
    /// or image channels missing or superfluous, batch sizes that differ), `group`
    /// does not divide the batch, or a computation fails.
    pub(crate) fn forward_tasks(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        group: usize,
    ) -> candle_core::Result<Tensor> {
        self.forward_with_residuals(latents, timestep, cond, group, None)
    }

    /// [`Unet::forward_tasks`] with ControlNet residuals added to the skip connections
    /// and the mid block's output, as diffusers' `down_block_additional_residuals` and
    /// `mid_block_additional_residual`.
    ///
    /// # Errors
    ///
    /// As [`Unet::forward_tasks`]; also when the residuals do not match the skips.
    pub(crate) fn forward_with_residuals(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        group: usize,
        residuals: Option<&Residuals>,
    ) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let (mut skips, mut xs, emb) = self.encode(latents, timestep, cond, group, None)?;
        if let Some(r) = residuals {
            if r.down.len() != skips.len() {
                return Err(candle_core::Error::Msg(format!(
                    "{} ControlNet residuals for {} skip connections",
                    r.down.len(),
                    skips.len()
                )));
            }
            for (skip, add) in skips.iter_mut().zip(&r.down) {
                *skip = (&*skip + add)?;
            }
            xs = (xs + &r.mid)?;
        }
        let context = &cond.context;
        let Some((conv_norm_out, conv_out)) = &self.out else {
            return Err(candle_core::Error::Msg(
                "a UNet encoder has no up blocks to predict with".into(),
            ));
        };

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("the UNet ran out of skip connections".into())
                })?;
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb), group)?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(conv) = &block.upsampler {
                // Upsample to the next skip's size: 2× unless a side was odd on the way down.
                let (h, w) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (xs.dim(2)? * 2, xs.dim(3)? * 2),
                };
                xs = conv.forward(&xs.upsample_nearest2d(h, w)?)?;
            }
        }

        let xs = conv_norm_out.forward_silu(&xs)?;
        conv_out.forward(&xs)
    }

    /// Runs the down half for [`Unet::forward_with_residuals`] and ControlNets:
    /// returns the skip connections (`conv_in`'s output, each ResNet's or attention's,
    /// each downsampler's), the mid block's output and the time embedding. `hint` (a
    /// ControlNet's embedded control image) is added to `conv_in`'s output.
    pub(crate) fn encode(
        &self,
        latents: &Tensor,
        timestep: f64,
        cond: &Conditioning,
        group: usize,
        hint: Option<&Tensor>,
    ) -> candle_core::Result<(Vec<Tensor>, Tensor, Tensor)> {
        let batch = latents.dim(0)?;
        let xs = match &cond.image {
            Some(image) => Tensor::cat(&[latents, image], 1)?,
            None => latents.clone(),
        };
        if xs.dim(1)? != self.in_channels {
            return Err(candle_core::Error::Msg(format!(
                "the UNet takes {} input channels, got {} (mask and masked-image latents {})",
                self.in_channels,
                xs.dim(1)?,
                if cond.image.is_some() {
                    "given"
                } else {
                    "missing"
                },
            )));
        }
        if group == 0 || !batch.is_multiple_of(group) {
            return Err(candle_core::Error::Msg(format!(
                "a batch of {batch} rows does not split into tasks of {group}"
            )));
        }
        let xs = if self.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs
        };

        // Every task shares the timestep: embed it for one task and repeat it.
        let t = (Tensor::ones(group, xs.dtype(), xs.device())? * timestep)?;
        let emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        let emb = Tensor::cat(&vec![&emb; batch / group], 0)?;
        let emb = match (&self.text_time, &cond.added) {
            (Some(tt), Some(added)) => {
                // diffusers' `get_aug_embed` for "text_time": [text_embeds, time_embeds].
                let time = tt.time_proj.forward(&added.time_ids.flatten_all()?)?;
                let time = time.reshape((batch, ()))?;
                let input = Tensor::cat(&[&added.text_embeds, &time], D::Minus1)?;
                let add = per_group(&input, group, |rows| tt.embedding.forward(rows))?;
                (emb + add)?
            }
            (None, None) => emb,
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "this UNet needs added conditioning (pooled text and time ids)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(candle_core::Error::Msg(
                    "added conditioning given to a UNet without add_embedding".into(),
                ));
            }
        };
        let context = &cond.context;

        let mut xs = self.conv_in.forward(&xs)?;
        if let Some(hint) = hint {
            xs = (xs + hint)?;
        }
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb), group)?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
                skips.push(xs.clone());
            }
            if let Some((conv, pad_self)) = &block.downsampler {
                if *pad_self {
                    xs = xs.pad_with_zeros(D::Minus1, 0, 1)?;
                    xs = xs.pad_with_zeros(D::Minus2, 0, 1)?;
                }
                xs = conv.forward(&xs)?;
                skips.push(xs.clone());
            }
        }

        let xs = self.mid_block.forward(&xs, &emb, context, group)?;
        Ok((skips, xs, emb))
    }
}
