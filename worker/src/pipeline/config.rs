//! Reads the diffusers / transformers config files into candle's model configs.
//!
//! The architecture always comes from the folder's own `config.json` files,
//! never from its name. Missing keys take the defaults of the diffusers or
//! transformers class that wrote the file, as `from_config` would; keys
//! describing features candle's models lack (SDXL added conditioning, GELU text
//! encoders, ...) are rejected here with the key's name rather than silently
//! ignored at load time.

use std::path::Path;

use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::error::PipelineError;

/// A config value diffusers writes either once for all blocks or once per block.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum PerBlock<T> {
    /// One value for every block.
    One(T),
    /// One value per block.
    Many(Vec<T>),
}

impl<T: Clone + PartialEq + std::fmt::Debug> PerBlock<T> {
    /// Expands to exactly `n` values; `key` names the config key in errors.
    fn expand(&self, n: usize, key: &str) -> Result<Vec<T>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(vs) if vs.len() == n => Ok(vs.clone()),
            PerBlock::Many(vs) => Err(format!(
                "{key} has {} entries but there are {n} blocks",
                vs.len()
            )),
        }
    }

    /// Returns the single value, requiring a list to hold one value repeated.
    fn uniform(&self, key: &str) -> Result<T, String> {
        match self {
            PerBlock::One(v) => Ok(v.clone()),
            PerBlock::Many(vs) => match vs.split_first() {
                Some((first, rest)) if rest.iter().all(|v| v == first) => Ok(first.clone()),
                _ => Err(format!(
                    "{key} = {vs:?}: candle needs one value for every block"
                )),
            },
        }
    }
}

/// Parses a JSON config file into `T`.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| PipelineError::config(path, format!("invalid: {e}")))
}

/// `model_index.json`: only its pipeline class is checked.
#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

/// Checks that `model_index.json` describes a diffusers pipeline.
pub(crate) fn check_model_index(path: &Path) -> Result<(), PipelineError> {
    let index: ModelIndex = read_json(path)?;
    match index.class_name {
        Some(name) if !name.is_empty() => Ok(()),
        _ => Err(PipelineError::config(
            path,
            "_class_name is missing: not a diffusers model_index.json",
        )),
    }
}

/// The keys of a diffusers `UNet2DConditionModel` config that kiln reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DiffusersUnet {
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    block_out_channels: Option<Vec<usize>>,
    down_block_types: Option<Vec<String>>,
    up_block_types: Option<Vec<String>>,
    mid_block_type: Option<String>,
    layers_per_block: Option<PerBlock<usize>>,
    attention_head_dim: Option<PerBlock<usize>>,
    num_attention_heads: Option<PerBlock<usize>>,
    transformer_layers_per_block: Option<PerBlock<usize>>,
    cross_attention_dim: Option<PerBlock<usize>>,
    norm_num_groups: Option<usize>,
    norm_eps: Option<f64>,
    use_linear_projection: Option<bool>,
    flip_sin_to_cos: Option<bool>,
    freq_shift: Option<f64>,
    downsample_padding: Option<usize>,
    mid_block_scale_factor: Option<f64>,
    center_input_sample: Option<bool>,
    act_fn: Option<String>,
    addition_embed_type: Option<String>,
    class_embed_type: Option<String>,
    time_cond_proj_dim: Option<usize>,
    encoder_hid_dim: Option<usize>,
    only_cross_attention: Option<PerBlock<bool>>,
    dual_cross_attention: Option<bool>,
    resnet_time_scale_shift: Option<String>,
    conv_in_kernel: Option<usize>,
    conv_out_kernel: Option<usize>,
    time_embedding_type: Option<String>,
}

/// A UNet ready to build: candle's config plus the channel counts it takes separately.
#[derive(Clone, Debug)]
pub(crate) struct UnetSpec {
    /// Latent channels in.
    pub(crate) in_channels: usize,
    /// Latent channels out.
    pub(crate) out_channels: usize,
    /// Width of the text embeddings the cross-attention expects.
    pub(crate) cross_attention_dim: usize,
    /// candle's UNet config.
    pub(crate) config: UNet2DConditionModelConfig,
}

/// Reads `unet/config.json`.
pub(crate) fn read_unet(path: &Path) -> Result<UnetSpec, PipelineError> {
    let raw: DiffusersUnet = read_json(path)?;
    unet_spec(raw).map_err(|m| PipelineError::config(path, m))
}

/// Maps a diffusers UNet config to candle's, with diffusers' defaults for missing keys.
fn unet_spec(raw: DiffusersUnet) -> Result<UnetSpec, String> {
    let unsupported = |key: &str, value: &dyn std::fmt::Debug| {
        Err(format!(
            "{key} = {value:?} is not supported by candle's UNet"
        ))
    };
    if let Some(v) = &raw.addition_embed_type {
        return unsupported("addition_embed_type (SDXL added conditioning)", v);
    }
    if let Some(v) = &raw.class_embed_type {
        return unsupported("class_embed_type", v);
    }
    if let Some(v) = &raw.time_cond_proj_dim {
        return unsupported("time_cond_proj_dim", v);
    }
    if let Some(v) = &raw.encoder_hid_dim {
        return unsupported("encoder_hid_dim", v);
    }
    if let Some(v) = raw.dual_cross_attention.filter(|&v| v) {
        return unsupported("dual_cross_attention", &v);
    }
    if let Some(v) = &raw.only_cross_attention {
        let any = match v {
            PerBlock::One(b) => *b,
            PerBlock::Many(bs) => bs.iter().any(|b| *b),
        };
        if any {
            return unsupported("only_cross_attention", v);
        }
    }
    for (key, value, expected) in [
        ("act_fn", &raw.act_fn, "silu"),
        (
            "mid_block_type",
            &raw.mid_block_type,
            "UNetMidBlock2DCrossAttn",
        ),
        (
            "resnet_time_scale_shift",
            &raw.resnet_time_scale_shift,
            "default",
        ),
        (
            "time_embedding_type",
            &raw.time_embedding_type,
            "positional",
        ),
    ] {
        if let Some(v) = value.as_deref().filter(|v| *v != expected) {
            return unsupported(key, &v);
        }
    }
    for (key, value) in [
        ("conv_in_kernel", raw.conv_in_kernel),
        ("conv_out_kernel", raw.conv_out_kernel),
    ] {
        if let Some(v) = value.filter(|&v| v != 3) {
            return unsupported(key, &v);
        }
    }

    let channels = raw
        .block_out_channels
        .unwrap_or_else(|| vec![320, 640, 1280, 1280]);
    let n = channels.len();
    if n == 0 {
        return Err("block_out_channels is empty".into());
    }
    let down_types = raw.down_block_types.unwrap_or_else(|| {
        vec![
            "CrossAttnDownBlock2D".into(),
            "CrossAttnDownBlock2D".into(),
            "CrossAttnDownBlock2D".into(),
            "DownBlock2D".into(),
        ]
    });
    let up_types = raw.up_block_types.unwrap_or_else(|| {
        vec![
            "UpBlock2D".into(),
            "CrossAttnUpBlock2D".into(),
            "CrossAttnUpBlock2D".into(),
            "CrossAttnUpBlock2D".into(),
        ]
    });
    if down_types.len() != n || up_types.len() != n {
        return Err(format!(
            "block_out_channels has {n} entries but down_block_types has {} and up_block_types {}",
            down_types.len(),
            up_types.len()
        ));
    }
    // diffusers' `attention_head_dim` is, for SD 1.x/2.x, really the number of heads
    // (a historical misnomer it keeps for compatibility); `num_attention_heads`, when
    // set, overrides it. candle's `BlockConfig::attention_head_dim` is the head count too.
    let heads = raw
        .num_attention_heads
        .or(raw.attention_head_dim)
        .unwrap_or(PerBlock::One(8))
        .expand(n, "attention_head_dim")?;
    let transformer_layers = raw
        .transformer_layers_per_block
        .unwrap_or(PerBlock::One(1))
        .expand(n, "transformer_layers_per_block")?;
    let layers_per_block = raw
        .layers_per_block
        .unwrap_or(PerBlock::One(2))
        .uniform("layers_per_block")?;
    let cross_attention_dim = raw
        .cross_attention_dim
        .unwrap_or(PerBlock::One(1280))
        .uniform("cross_attention_dim")?;
    let norm_num_groups = raw.norm_num_groups.unwrap_or(32);

    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let cross = match down_types[i].as_str() {
            "CrossAttnDownBlock2D" => true,
            "DownBlock2D" => false,
            other => {
                return Err(format!(
                    "down_block_types[{i}] = {other:?}: expected CrossAttnDownBlock2D or DownBlock2D"
                ));
            }
        };
        // Up block j mirrors down block n - 1 - j.
        let up_index = n - 1 - i;
        let expected_up = if cross {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        };
        if up_types[up_index] != expected_up {
            return Err(format!(
                "up_block_types[{up_index}] = {:?}: expected {expected_up} to mirror down_block_types[{i}]",
                up_types[up_index]
            ));
        }
        let (c, h) = (channels[i], heads[i]);
        if c == 0 || norm_num_groups == 0 || !c.is_multiple_of(norm_num_groups) {
            return Err(format!(
                "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {norm_num_groups}"
            ));
        }
        // The mid block uses the last block's head count even when that block has no attention.
        if (cross || i == n - 1) && (h == 0 || !c.is_multiple_of(h)) {
            return Err(format!(
                "block_out_channels[{i}] = {c} does not split into {h} attention heads"
            ));
        }
        blocks.push(BlockConfig {
            out_channels: c,
            use_cross_attn: cross.then_some(transformer_layers[i]),
            attention_head_dim: h,
        });
    }

    Ok(UnetSpec {
        in_channels: raw.in_channels.unwrap_or(4),
        out_channels: raw.out_channels.unwrap_or(4),
        cross_attention_dim,
        config: UNet2DConditionModelConfig {
            center_input_sample: raw.center_input_sample.unwrap_or(false),
            flip_sin_to_cos: raw.flip_sin_to_cos.unwrap_or(true),
            freq_shift: raw.freq_shift.unwrap_or(0.0),
            blocks,
            layers_per_block,
            downsample_padding: raw.downsample_padding.unwrap_or(1),
            mid_block_scale_factor: raw.mid_block_scale_factor.unwrap_or(1.0),
            norm_num_groups,
            norm_eps: raw.norm_eps.unwrap_or(1e-5),
            cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: raw.use_linear_projection.unwrap_or(false),
        },
    })
}

/// The keys of a diffusers `AutoencoderKL` config that kiln reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DiffusersVae {
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    block_out_channels: Option<Vec<usize>>,
    down_block_types: Option<Vec<String>>,
    up_block_types: Option<Vec<String>>,
    layers_per_block: Option<usize>,
    latent_channels: Option<usize>,
    norm_num_groups: Option<usize>,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
    act_fn: Option<String>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
}

/// A VAE ready to build.
#[derive(Clone, Debug)]
pub(crate) struct VaeSpec {
    /// Image channels in (encoder).
    pub(crate) in_channels: usize,
    /// Image channels out (decoder).
    pub(crate) out_channels: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding.
    pub(crate) scaling_factor: f64,
    /// Image pixels per latent pixel along each side.
    pub(crate) downscale: usize,
    /// candle's VAE config.
    pub(crate) config: AutoEncoderKLConfig,
}

/// Reads `vae/config.json`.
pub(crate) fn read_vae(path: &Path) -> Result<VaeSpec, PipelineError> {
    let raw: DiffusersVae = read_json(path)?;
    vae_spec(raw).map_err(|m| PipelineError::config(path, m))
}

/// Maps a diffusers AutoencoderKL config to candle's, with diffusers' defaults.
fn vae_spec(raw: DiffusersVae) -> Result<VaeSpec, String> {
    let channels = raw.block_out_channels.unwrap_or_else(|| vec![64]);
    let n = channels.len();
    if n == 0 {
        return Err("block_out_channels is empty".into());
    }
    for (key, types, expected) in [
        (
            "down_block_types",
            &raw.down_block_types,
            "DownEncoderBlock2D",
        ),
        ("up_block_types", &raw.up_block_types, "UpDecoderBlock2D"),
    ] {
        if let Some(types) = types {
            if types.len() != n {
                return Err(format!(
                    "{key} has {} entries but block_out_channels has {n}",
                    types.len()
                ));
            }
            if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != expected) {
                return Err(format!("{key}[{i}] = {t:?}: expected {expected}"));
            }
        }
    }
    if let Some(act) = raw.act_fn.as_deref().filter(|a| *a != "silu") {
        return Err(format!("act_fn = {act:?} is not supported by candle's VAE"));
    }
    if let Some(shift) = raw.shift_factor.filter(|s| *s != 0.0) {
        return Err(format!(
            "shift_factor = {shift} (an SD3/Flux VAE) is not supported"
        ));
    }
    if raw.mid_block_add_attention == Some(false) {
        return Err("mid_block_add_attention = false is not supported by candle's VAE".into());
    }
    let norm_num_groups = raw.norm_num_groups.unwrap_or(32);
    if let Some((i, c)) = channels
        .iter()
        .enumerate()
        .find(|(_, c)| norm_num_groups == 0 || !c.is_multiple_of(norm_num_groups))
    {
        return Err(format!(
            "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {norm_num_groups}"
        ));
    }
    let scaling_factor = raw.scaling_factor.unwrap_or(0.18215);
    if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
        return Err(format!(
            "scaling_factor = {scaling_factor} must be positive"
        ));
    }
    Ok(VaeSpec {
        in_channels: raw.in_channels.unwrap_or(3),
        out_channels: raw.out_channels.unwrap_or(3),
        scaling_factor,
        // Every block but the last halves the resolution.
        downscale: 1 << (n - 1),
        config: AutoEncoderKLConfig {
            block_out_channels: channels,
            layers_per_block: raw.layers_per_block.unwrap_or(1),
            latent_channels: raw.latent_channels.unwrap_or(4),
            norm_num_groups,
            use_quant_conv: raw.use_quant_conv.unwrap_or(true),
            use_post_quant_conv: raw.use_post_quant_conv.unwrap_or(true),
        },
    })
}

/// The keys of a transformers `CLIPTextConfig` that kiln reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TransformersClip {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    vocab_size: Option<usize>,
    hidden_act: Option<String>,
    projection_dim: Option<usize>,
    layer_norm_eps: Option<f64>,
}

/// Reads `text_encoder/config.json`.
pub(crate) fn read_clip(path: &Path) -> Result<ClipTextConfig, PipelineError> {
    let raw: TransformersClip = read_json(path)?;
    clip_config(raw).map_err(|m| PipelineError::config(path, m))
}

/// Maps a transformers CLIPTextConfig to candle's, with transformers' defaults.
fn clip_config(raw: TransformersClip) -> Result<ClipTextConfig, String> {
    let activation = match raw.hidden_act.as_deref().unwrap_or("quick_gelu") {
        "quick_gelu" => Activation::QuickGelu,
        other => {
            return Err(format!(
                "hidden_act = {other:?}: candle's CLIP text model implements quick_gelu only \
                 (SD 2.x and SD-Turbo text encoders use gelu)"
            ));
        }
    };
    if let Some(eps) = raw.layer_norm_eps.filter(|e| (e - 1e-5).abs() > 1e-12) {
        return Err(format!(
            "layer_norm_eps = {eps}: candle's CLIP text model uses 1e-5"
        ));
    }
    let embed_dim = raw.hidden_size.unwrap_or(512);
    let heads = raw.num_attention_heads.unwrap_or(8);
    if heads == 0 || !embed_dim.is_multiple_of(heads) {
        return Err(format!(
            "hidden_size = {embed_dim} does not split into num_attention_heads = {heads}"
        ));
    }
    let max_position_embeddings = raw.max_position_embeddings.unwrap_or(77);
    if max_position_embeddings < 3 {
        return Err(format!(
            "max_position_embeddings = {max_position_embeddings} leaves no room for a prompt"
        ));
    }
    Ok(ClipTextConfig {
        vocab_size: raw.vocab_size.unwrap_or(49408),
        embed_dim,
        activation,
        intermediate_size: raw.intermediate_size.unwrap_or(2048),
        max_position_embeddings,
        pad_with: None,
        num_hidden_layers: raw.num_hidden_layers.unwrap_or(12),
        num_attention_heads: heads,
        projection_dim: raw.projection_dim.unwrap_or(512),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(json: &str) -> Result<UnetSpec, String> {
        unet_spec(serde_json::from_str(json).map_err(|e| e.to_string())?)
    }

    /// The UNet config of stable-diffusion-v1-5, as diffusers ships it.
    const SD15_UNET: &str = r#"{
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
        "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;

    #[test]
    fn sd15_unet_maps_to_candles_preset() -> Result<(), String> {
        let spec = unet(SD15_UNET)?;
        let c = &spec.config;
        let blocks: Vec<_> = c
            .blocks
            .iter()
            .map(|b| (b.out_channels, b.use_cross_attn, b.attention_head_dim))
            .collect();
        assert_eq!(
            blocks,
            [
                (320, Some(1), 8),
                (640, Some(1), 8),
                (1280, Some(1), 8),
                (1280, None, 8)
            ]
        );
        assert_eq!(spec.cross_attention_dim, 768);
        assert_eq!((c.layers_per_block, c.norm_num_groups), (2, 32));
        assert!(c.flip_sin_to_cos && !c.use_linear_projection && !c.center_input_sample);
        Ok(())
    }

    #[test]
    fn per_block_head_counts_and_num_attention_heads() -> Result<(), String> {
        // SD 2.1 writes a list; num_attention_heads, when set, takes precedence.
        let sd21 = SD15_UNET.replace(
            r#""attention_head_dim": 8"#,
            r#""attention_head_dim": [5, 10, 20, 20]"#,
        );
        let heads: Vec<_> = unet(&sd21)?
            .config
            .blocks
            .iter()
            .map(|b| b.attention_head_dim)
            .collect();
        assert_eq!(heads, [5, 10, 20, 20]);
        let both = sd21.replace(r#""act_fn""#, r#""num_attention_heads": 4, "act_fn""#);
        let heads: Vec<_> = unet(&both)?
            .config
            .blocks
            .iter()
            .map(|b| b.attention_head_dim)
            .collect();
        assert_eq!(heads, [4, 4, 4, 4]);
        Ok(())
    }

    #[test]
    fn rejects_what_candle_cannot_run() {
        let sdxl = SD15_UNET.replace(
            r#""act_fn""#,
            r#""addition_embed_type": "text_time", "act_fn""#,
        );
        assert!(unet(&sdxl).is_err_and(|e| e.contains("addition_embed_type")));
        let mismatched = SD15_UNET.replace(
            r#"["UpBlock2D", "CrossAttnUpBlock2D""#,
            r#"["CrossAttnUpBlock2D", "UpBlock2D""#,
        );
        assert!(unet(&mismatched).is_err_and(|e| e.contains("up_block_types[1]")));
        let groups = SD15_UNET.replace(r#""norm_num_groups": 32"#, r#""norm_num_groups": 7"#);
        assert!(unet(&groups).is_err_and(|e| e.contains("norm_num_groups")));
        let gelu: TransformersClip =
            serde_json::from_str(r#"{"hidden_act": "gelu"}"#).unwrap_or_default();
        assert!(clip_config(gelu).is_err_and(|e| e.contains("hidden_act")));
    }

    #[test]
    fn vae_defaults_and_downscale() -> Result<(), String> {
        let raw: DiffusersVae = serde_json::from_str(
            r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512}"#,
        )
        .map_err(|e| e.to_string())?;
        let spec = vae_spec(raw)?;
        assert_eq!(spec.downscale, 8);
        assert_eq!(spec.scaling_factor, 0.18215);
        assert_eq!(spec.config.latent_channels, 4);
        Ok(())
    }
}
