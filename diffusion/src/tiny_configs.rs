//! The config files of the tiny models, one set per [`TinyKind`].
//!
//! Each mirrors the file its real counterpart ships (stable-diffusion-v1-5,
//! stable-diffusion-2-1, stable-diffusion-xl-base-1.0,
//! stable-diffusion-inpainting) with the sizes shrunk: the keys that decide
//! the architecture (`hidden_act`, `attention_head_dim` lists,
//! `use_linear_projection`, `addition_embed_type`, `in_channels`,
//! `prediction_type`, ...) keep their real values so the loader takes the
//! same branches it takes for real weights. The SD 1.5 files are byte-for-byte
//! those kiln has always written.

use serde_json::{Value, json};

use super::text::ENDOFTEXT;
use super::tiny::TinyKind;
use super::tiny_tokenizer::TinyVocab;

/// diffusers version stamped in the configs, as real folders carry one.
const DIFFUSERS_VERSION: &str = "0.30.0";
/// SD 2.x's and SDXL's OpenCLIP tokenizers pad with `!`.
pub(crate) const OPENCLIP_PAD: &str = "!";
/// Sinusoidal channels per SDXL time id in the tiny SDXL (SDXL: 256).
const TINY_TIME_EMBED_DIM: usize = 32;

/// `model_index.json`: the real pipeline class and its components, no safety checker.
pub(crate) fn model_index(kind: TinyKind) -> Value {
    match kind {
        TinyKind::Sd15 | TinyKind::Sd21 | TinyKind::Inpaint => json!({
            "_class_name": if kind == TinyKind::Inpaint {
                "StableDiffusionInpaintPipeline"
            } else {
                "StableDiffusionPipeline"
            },
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
        TinyKind::Sdxl => json!({
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "feature_extractor": [null, null],
            "force_zeros_for_empty_prompt": true,
            "image_encoder": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    }
}

/// The scheduler each real model ships: DDIM (SD 1.5 ε, SD 2.1-768 v-prediction),
/// Euler for SDXL.
pub(crate) fn scheduler_config(kind: TinyKind) -> Value {
    match kind {
        TinyKind::Sd15 | TinyKind::Inpaint => json!({
            "_class_name": "DDIMScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "set_alpha_to_one": false,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null
        }),
        TinyKind::Sd21 => json!({
            "_class_name": "DDIMScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "trained_betas": null
        }),
        TinyKind::Sdxl => json!({
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null,
            "use_karras_sigmas": false
        }),
    }
}

/// The pad token of a tokenizer folder: `index` 0 is `tokenizer`, 1 is `tokenizer_2`.
pub(crate) fn pad_token(kind: TinyKind, index: usize) -> &'static str {
    match (kind, index) {
        (TinyKind::Sd21, _) | (TinyKind::Sdxl, 1) => OPENCLIP_PAD,
        _ => ENDOFTEXT,
    }
}

/// Text encoder sizes: (hidden, heads, feed-forward) of encoder `index`.
fn text_sizes(kind: TinyKind, index: usize) -> (usize, usize, usize) {
    match (kind, index) {
        // SDXL's second encoder is the wider one (1280 against 768).
        (TinyKind::Sdxl, 1) => (48, 4, 192),
        _ => (32, 4, 128),
    }
}

/// Returns the cross-attention width: the text encoders' widths added up.
fn context_width(kind: TinyKind) -> usize {
    match kind {
        TinyKind::Sdxl => text_sizes(kind, 0).0 + text_sizes(kind, 1).0,
        _ => text_sizes(kind, 0).0,
    }
}

/// Width of the tiny SDXL's pooled text projection (SDXL: 1280).
const TINY_PROJECTION_DIM: usize = 40;

/// A 2-layer CLIP text encoder config over the tiny vocabulary: encoder `index`
/// (0 for `text_encoder`, 1 for SDXL's `text_encoder_2`).
pub(crate) fn text_encoder_config(kind: TinyKind, index: usize, vocab: &TinyVocab) -> Value {
    let (hidden, heads, ff) = text_sizes(kind, index);
    let openclip = matches!((kind, index), (TinyKind::Sd21, _) | (TinyKind::Sdxl, 1));
    let pad = vocab
        .tokens
        .iter()
        .position(|t| t == pad_token(kind, index))
        .unwrap_or(vocab.eos() as usize);
    let name = match kind {
        TinyKind::Sd15 => "kiln/tiny-sd",
        TinyKind::Sd21 => "kiln/tiny-sd21",
        TinyKind::Sdxl => "kiln/tiny-sdxl",
        TinyKind::Inpaint => "kiln/tiny-sd-inpainting",
    };
    json!({
        "_name_or_path": name,
        "architectures": [if index == 1 { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "attention_dropout": 0.0,
        "bos_token_id": vocab.bos(),
        "dropout": 0.0,
        "eos_token_id": vocab.eos(),
        "hidden_act": if openclip { "gelu" } else { "quick_gelu" },
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": ff,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": 2,
        "pad_token_id": pad,
        "projection_dim": if index == 1 { TINY_PROJECTION_DIM } else { 32 },
        "torch_dtype": "float32",
        "vocab_size": vocab.tokens.len()
    })
}

/// The UNet: two levels of 32 and 64 channels.
///
/// SD 1.5 and inpainting: cross-attention at 32 channels with 4 heads, as
/// kiln's first tiny model. SD 2.1: per-level head counts `[2, 4]` (heads of
/// width 16 everywhere, as SD 2.x's are 64 wide) and linear projections.
/// SDXL: no attention at the first level (like SDXL's 320-channel level), two
/// transformer layers at the second and in the mid block, two ResNets per
/// level, and the added conditioning.
pub(crate) fn unet_config(kind: TinyKind) -> Value {
    let mut config = json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [32, 64],
        "center_input_sample": false,
        "cross_attention_dim": context_width(kind),
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": if kind == TinyKind::Inpaint { 9 } else { 4 },
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": false
    });
    let extra = match kind {
        TinyKind::Sd15 | TinyKind::Inpaint => json!({}),
        TinyKind::Sd21 => json!({
            "attention_head_dim": [2, 4],
            "dual_cross_attention": false,
            "num_class_embeds": null,
            "only_cross_attention": false,
            "upcast_attention": true,
            "use_linear_projection": true
        }),
        TinyKind::Sdxl => json!({
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": TINY_TIME_EMBED_DIM,
            "attention_head_dim": [2, 4],
            "class_embed_type": null,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "layers_per_block": 2,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "projection_class_embeddings_input_dim":
                TINY_PROJECTION_DIM + super::config::SDXL_TIME_IDS * TINY_TIME_EMBED_DIM,
            "resnet_time_scale_shift": "default",
            "time_embedding_type": "positional",
            "transformer_layers_per_block": [1, 2],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": null,
            "use_linear_projection": true
        }),
    };
    if let (Value::Object(base), Value::Object(extra)) = (&mut config, extra) {
        base.extend(extra);
        base.sort_keys();
    }
    config
}

/// A four-level AutoencoderKL (8× downscale) with 4 latent channels; SDXL's scaling factor.
pub(crate) fn vae_config(kind: TinyKind) -> Value {
    let mut config = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [16, 16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
    });
    if kind == TinyKind::Sdxl
        && let Value::Object(map) = &mut config
    {
        map.insert("force_upcast".into(), json!(true));
        map.insert("scaling_factor".into(), json!(0.13025));
        map.sort_keys();
    }
    config
}
