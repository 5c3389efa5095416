//! The tiny model: an SD-1.5-architecture model with deterministic random weights.
//!
//! Tests and the quickstart render with it. It is written in exactly the
//! diffusers layout and tensor names of a real SD 1.5 folder, so it exercises
//! the real loader. Sizes (FIELD-NOTES): UNet blocks of 32 (cross-attention,
//! 4 heads) and 64 channels, one layer per block, 8 norm groups,
//! cross-attention width 32; VAE channels [16, 16, 32, 32] (four blocks keep
//! the real 8× latent factor); CLIP width 32, 2 layers, 4 heads, 77 positions.
//!
//! The modules are built on a `VarMap` only to enumerate every parameter's name
//! and shape: its own initial values come from an unseeded generator and are
//! never saved. Each saved tensor is generated from the portable Philox stream
//! keyed by a hash of the component and tensor name: norm scales 1, biases
//! N(0, 0.02²), embedding tables N(0, 1), other weights N(0, 1/fan_in), with
//! the cross-attention query and key weights doubled. That keeps activations in
//! range through every layer, so images are neither black nor saturated and
//! visibly change with prompt and seed. The bytes written are identical on
//! every run.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::config;
use super::error::PipelineError;
use super::layout;
use super::noise::{self, Purpose};
use super::tiny_tokenizer::{self, TinyVocab};

/// Philox seed of the tiny model's weights ("kiln" in ASCII).
const WEIGHTS_SEED: u64 = 0x6b69_6c6e;
/// Gain of the UNet's cross-attention query and key weights. At 1 the attention
/// logits have unit spread and each pixel averages all 77 text tokens, so the
/// prompt barely shows (mean byte difference ~15 between two prompts); at 2 the
/// logits spread 4× wider, attention picks out tokens as a trained model's does,
/// and the difference is ~40 (a new seed: ~70).
const CROSS_ATTENTION_QK_GAIN: f32 = 2.0;
/// diffusers version stamped in the configs, as real folders carry one.
const DIFFUSERS_VERSION: &str = "0.30.0";

/// Writes the tiny random-weight model (deterministic: same bytes every time) into `dir`.
pub fn write_tiny_model(dir: &Path) -> Result<(), PipelineError> {
    for sub in ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|e| PipelineError::io(path, e))?;
    }
    write_json(dir, layout::MODEL_INDEX, &model_index())?;
    write_json(dir, layout::SCHEDULER_CONFIG, &scheduler_config())?;

    let vocab = TinyVocab::new();
    write_json(dir, layout::TOKENIZER_JSON, &vocab.tokenizer_json())?;
    write_json(dir, layout::TOKENIZER_VOCAB, &vocab.vocab_json())?;
    write_text(dir, layout::TOKENIZER_MERGES, &vocab.merges_txt())?;
    write_json(
        dir,
        layout::TOKENIZER_CONFIG,
        &tiny_tokenizer::tokenizer_config_json(),
    )?;
    write_json(
        dir,
        layout::SPECIAL_TOKENS_MAP,
        &tiny_tokenizer::special_tokens_map_json(),
    )?;

    // Each component is built from the config file just written, read back by the
    // loader's own parser, so the weights always match what the loader will expect.
    write_json(
        dir,
        layout::TEXT_ENCODER_CONFIG,
        &text_encoder_config(&vocab),
    )?;
    let clip = config::read_clip(&dir.join(layout::TEXT_ENCODER_CONFIG))?;
    let tensors = random_weights("text_encoder", |vb| {
        ClipTextTransformer::new(vb.pp("text_model"), &clip).map(drop)
    })?;
    save(dir, layout::TEXT_ENCODER_WEIGHTS, &tensors)?;

    write_json(dir, layout::UNET_CONFIG, &unet_config())?;
    let unet = config::read_unet(&dir.join(layout::UNET_CONFIG))?;
    let tensors = random_weights("unet", |vb| {
        UNet2DConditionModel::new(
            vb,
            unet.in_channels,
            unet.out_channels,
            false,
            unet.config.clone(),
        )
        .map(drop)
    })?;
    save(dir, layout::UNET_WEIGHTS, &tensors)?;

    write_json(dir, layout::VAE_CONFIG, &vae_config())?;
    let vae = config::read_vae(&dir.join(layout::VAE_CONFIG))?;
    let tensors = random_weights("vae", |vb| {
        AutoEncoderKL::new(vb, vae.in_channels, vae.out_channels, vae.config.clone()).map(drop)
    })?;
    save(dir, layout::VAE_WEIGHTS, &tensors)?;
    Ok(())
}

/// `model_index.json` of a StableDiffusionPipeline without safety checker.
fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
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
    })
}

/// DDIM with Stable Diffusion 1.5's training schedule.
fn scheduler_config() -> Value {
    json!({
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
    })
}

/// A 2-layer, 32-wide CLIPTextModel over the tiny vocabulary.
fn text_encoder_config(vocab: &TinyVocab) -> Value {
    json!({
        "_name_or_path": "kiln/tiny-sd",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": vocab.bos(),
        "dropout": 0.0,
        "eos_token_id": vocab.eos(),
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": vocab.eos(),
        "projection_dim": 32,
        "torch_dtype": "float32",
        "vocab_size": vocab.tokens.len()
    })
}

/// A two-level UNet: 32 channels with cross-attention, then 64 without.
fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": 4,
        "block_out_channels": [32, 64],
        "center_input_sample": false,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": false
    })
}

/// A four-level AutoencoderKL (8× downscale) with 4 latent channels.
fn vae_config() -> Value {
    json!({
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
    })
}

/// Builds a module on a `VarMap` and returns deterministic values for all its parameters,
/// under the tensor names real checkpoints use.
fn random_weights(
    component: &str,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> Result<HashMap<String, Tensor>, PipelineError> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut tensors = HashMap::with_capacity(vars.len());
    for (name, var) in vars.iter() {
        let name = diffusers_name(name);
        let tensor = tiny_tensor(component, &name, var.shape())?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}

/// Renames candle's legacy VAE attention parameters to the names diffusers saves.
///
/// candle's `AttentionBlock` asks for `to_q`/`to_k`/`to_v`/`to_out.0` when the
/// weights contain `to_q.weight` and for `query`/`key`/`value`/`proj_attn`
/// otherwise, so a fresh VarMap gets the legacy names.
fn diffusers_name(name: &str) -> String {
    name.split('.')
        .map(|segment| match segment {
            "query" => "to_q",
            "key" => "to_k",
            "value" => "to_v",
            "proj_attn" => "to_out.0",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Returns the deterministic value of one tiny-model parameter.
fn tiny_tensor(component: &str, name: &str, shape: &Shape) -> Result<Tensor, PipelineError> {
    let dims = shape.dims();
    let len = shape.elem_count();
    let digest = Sha256::digest(format!("{component}/{name}").as_bytes());
    let stream = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
    let normal = || noise::standard_normal(WEIGHTS_SEED, Purpose::Weights(stream), 0, len);
    let scaled = |scale: f32| normal().into_iter().map(|x| x * scale).collect::<Vec<_>>();
    let values = if name.ends_with(".bias") {
        scaled(0.02)
    } else if dims.len() == 1 {
        // One-dimensional weights are group/layer-norm scales.
        vec![1.0; len]
    } else if name.ends_with("_embedding.weight") {
        normal()
    } else {
        let fan_in: usize = dims.iter().skip(1).product();
        let cross_qk = name.contains(".attn2.to_q.") || name.contains(".attn2.to_k.");
        let gain = if cross_qk {
            CROSS_ATTENTION_QK_GAIN
        } else {
            1.0
        };
        scaled(gain / (fan_in.max(1) as f32).sqrt())
    };
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// Writes pretty JSON with a trailing newline.
fn write_json(dir: &Path, rel: &str, value: &Value) -> Result<(), PipelineError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| PipelineError::config(dir.join(rel), e.to_string()))?;
    text.push('\n');
    write_text(dir, rel, &text)
}

/// Writes a text file.
fn write_text(dir: &Path, rel: &str, text: &str) -> Result<(), PipelineError> {
    let path = dir.join(rel);
    std::fs::write(&path, text).map_err(|e| PipelineError::io(path, e))
}

/// Saves tensors with candle's safetensors writer (sorted by name: deterministic).
fn save(dir: &Path, rel: &str, tensors: &HashMap<String, Tensor>) -> Result<(), PipelineError> {
    let path = dir.join(rel);
    candle_core::safetensors::save(tensors, &path).map_err(|e| PipelineError::Weights {
        file: path,
        message: format!("cannot write: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_attention_gets_diffusers_names() {
        assert_eq!(
            diffusers_name("decoder.mid_block.attentions.0.proj_attn.weight"),
            "decoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            diffusers_name("encoder.mid_block.attentions.0.query.bias"),
            "encoder.mid_block.attentions.0.to_q.bias"
        );
        assert_eq!(diffusers_name("conv_in.weight"), "conv_in.weight");
    }

    #[test]
    fn writes_the_same_bytes_every_time() -> Result<(), Box<dyn std::error::Error>> {
        let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        write_tiny_model(a.path())?;
        write_tiny_model(b.path())?;
        let files = [
            layout::MODEL_INDEX,
            layout::SCHEDULER_CONFIG,
            layout::TEXT_ENCODER_CONFIG,
            layout::TEXT_ENCODER_WEIGHTS,
            layout::TOKENIZER_JSON,
            layout::TOKENIZER_VOCAB,
            layout::TOKENIZER_MERGES,
            layout::TOKENIZER_CONFIG,
            layout::SPECIAL_TOKENS_MAP,
            layout::UNET_CONFIG,
            layout::UNET_WEIGHTS,
            layout::VAE_CONFIG,
            layout::VAE_WEIGHTS,
        ];
        for rel in files {
            let (x, y) = (
                std::fs::read(a.path().join(rel))?,
                std::fs::read(b.path().join(rel))?,
            );
            assert!(!x.is_empty(), "{rel} is empty");
            println!("{rel}: {} bytes", x.len());
            assert!(x == y, "{rel} differs between two writes");
        }
        Ok(())
    }

    #[test]
    fn weights_use_diffusers_tensor_names() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        write_tiny_model(dir.path())?;
        let names = |rel: &str| -> Result<Vec<String>, Box<dyn std::error::Error>> {
            let tensors = candle_core::safetensors::load(dir.path().join(rel), &Device::Cpu)?;
            Ok(tensors.into_keys().collect())
        };
        let vae = names(layout::VAE_WEIGHTS)?;
        assert!(
            vae.iter()
                .any(|n| n == "decoder.mid_block.attentions.0.to_q.weight")
        );
        assert!(
            vae.iter()
                .any(|n| n == "decoder.mid_block.attentions.0.to_out.0.bias")
        );
        assert!(
            !vae.iter()
                .any(|n| n.contains("query") || n.contains("proj_attn"))
        );
        let unet = names(layout::UNET_WEIGHTS)?;
        assert!(
            unet.iter()
                .any(|n| n == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
        );
        let clip = names(layout::TEXT_ENCODER_WEIGHTS)?;
        assert!(clip.iter().all(|n| n.starts_with("text_model.")));
        assert!(
            clip.iter()
                .any(|n| n == "text_model.embeddings.token_embedding.weight")
        );
        Ok(())
    }
}
