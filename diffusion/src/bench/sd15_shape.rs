//! An SD-1.5-shaped model with random weights, for benchmarks only.
//!
//! The folder is the tiny SD 1.5 model (tokenizer, scheduler, model index)
//! with the text encoder, UNet and VAE replaced by the real SD 1.5 sizes:
//! UNet levels 320/640/1280/1280 with 2 ResNets each, 8 heads,
//! cross-attention 768, 32 norm groups; VAE [128, 256, 512, 512]; CLIP
//! ViT-L/14 (768 wide, 12 layers, 12 heads, 49408-token embedding table). The
//! configs are stable-diffusion-v1-5's own files, so diffusers loads the same
//! folder (`bench/diffusers_reference.py`) and both sides run identical
//! weights.
//!
//! About 4.3 GB of f32: the weights are streamed to disk one tensor at a time
//! (a lazy safetensors view generates each tensor when the writer asks for
//! its bytes), and the modules are built on a backend that only records
//! names and shapes, so writing needs little memory. Values are uniform with
//! the spread the tiny models use (norm scales 1, biases ±0.02·√3, other
//! weights of variance 1/fan_in), from a counter-based generator keyed by the
//! tensor name: the files are the same on every run. Timing does not depend
//! on the values as long as activations stay finite, which this scaling
//! keeps them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::clip::ClipTextModel;
use crate::config;
use crate::error::PipelineError;
use crate::layout::{self, TEXT_1};
use crate::noise::philox4x32_10;
use crate::tiny::diffusers_name;
use crate::unet::Unet;
use crate::write_tiny_model;

/// Philox key of the weights ("kiln-sd15" folded into 64 bits).
const WEIGHTS_KEY: [u32; 2] = [0x6b69_6c6e, 0x7364_3135];

/// `unet/config.json` of stable-diffusion-v1-5.
fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": [
            "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": [
            "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"
        ]
    })
}

/// `vae/config.json` of stable-diffusion-v1-5.
fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
    })
}

/// `text_encoder/config.json`: CLIP ViT-L/14's text tower, with the tiny tokenizer's
/// special-token ids (its ids all fall inside the real 49408-row table).
fn text_encoder_config(tiny: &Value) -> Value {
    let mut config = json!({
        "_name_or_path": "kiln/sd15-shape",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "vocab_size": 49408
    });
    if let Value::Object(map) = &mut config {
        for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = tiny.get(key) {
                map.insert(key.into(), v.clone());
            }
        }
        map.sort_keys();
    }
    config
}

/// Writes the SD-1.5-shaped random-weight model into `dir` (about 4.3 GB).
///
/// # Errors
///
/// `Io` when a folder or file cannot be written, `Weights` when a weights file
/// cannot be serialised; `Config` only if kiln's own configs were inconsistent.
pub fn write_sd15_shaped_model(dir: &Path) -> Result<(), PipelineError> {
    // Tokenizer, scheduler and model index are the tiny SD 1.5 model's; the three
    // networks are replaced below.
    write_tiny_model(dir)?;

    let text_config_path = dir.join(TEXT_1.config());
    let tiny_text: Value = config::read_json(&text_config_path)?;
    write_json(dir, &TEXT_1.config(), &text_encoder_config(&tiny_text))?;
    let clip = config::read_clip(&text_config_path, false)?;
    let shapes = parameter_shapes(|vb| ClipTextModel::new(vb, &clip).map(drop))?;
    write_weights(dir, &TEXT_1.weights(), "text_encoder", shapes)?;

    write_json(dir, layout::UNET_CONFIG, &unet_config())?;
    let unet = config::read_unet(&dir.join(layout::UNET_CONFIG))?;
    let shapes = parameter_shapes(|vb| Unet::new(vb, &unet).map(drop))?;
    write_weights(dir, layout::UNET_WEIGHTS, "unet", shapes)?;

    write_json(dir, layout::VAE_CONFIG, &vae_config())?;
    let vae = config::read_vae(&dir.join(layout::VAE_CONFIG))?;
    let shapes = parameter_shapes(|vb| {
        AutoEncoderKL::new(vb, vae.in_channels, vae.out_channels, vae.config.clone()).map(drop)
    })?;
    write_weights(dir, layout::VAE_WEIGHTS, "vae", shapes)?;
    Ok(())
}

/// A backend that serves a broadcast zero of any requested shape (no memory) and
/// records the name and shape, so building a module lists its parameters.
struct ShapeRecorder {
    /// Name → dims of every parameter asked for.
    seen: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), shape.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "tensor {name}: a parameter without a shape cannot be generated"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // candle's VAE attention then asks for its legacy names, renamed on writing.
        false
    }
}

/// Builds a module on a [`ShapeRecorder`] and returns its parameters under diffusers' names.
fn parameter_shapes(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> Result<BTreeMap<String, Vec<usize>>, PipelineError> {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = ShapeRecorder {
        seen: Arc::clone(&seen),
    };
    build(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(seen
        .into_iter()
        .map(|(name, dims)| (diffusers_name(&name), dims))
        .collect())
}

/// One parameter whose bytes are generated when the safetensors writer asks for them.
struct LazyTensor {
    /// Dimensions.
    dims: Vec<usize>,
    /// Half-width of the uniform distribution; `None` for a norm scale (all ones).
    spread: Option<f32>,
    /// Generator stream: a hash of the component and tensor name.
    stream: u32,
}

impl LazyTensor {
    /// Returns the parameter's spec: ones for 1-D norm scales, else uniform with
    /// the tiny models' standard deviations (biases 0.02, weights 1/√fan_in).
    fn new(component: &str, name: &str, dims: Vec<usize>) -> Self {
        let digest = Sha256::digest(format!("{component}/{name}").as_bytes());
        let stream = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let std = if name.ends_with(".bias") {
            Some(0.02)
        } else if dims.len() == 1 {
            None
        } else if name.ends_with("_embedding.weight") {
            Some(1.0)
        } else {
            let fan_in: usize = dims.iter().skip(1).product();
            Some(1.0 / (fan_in.max(1) as f32).sqrt())
        };
        // A uniform on [-a, a] has standard deviation a / √3.
        let spread = std.map(|s| s * 3f32.sqrt());
        Self {
            dims,
            spread,
            stream,
        }
    }
}

impl safetensors::View for LazyTensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.dims
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let len: usize = self.dims.iter().product();
        let mut bytes = Vec::with_capacity(len * 4);
        let Some(spread) = self.spread else {
            for _ in 0..len {
                bytes.extend_from_slice(&1f32.to_le_bytes());
            }
            return Cow::Owned(bytes);
        };
        let scale = spread / (1u64 << 31) as f32;
        let mut block = 0u32;
        let mut high = 0u32;
        while bytes.len() < len * 4 {
            let words = philox4x32_10([block, high, 4, self.stream], WEIGHTS_KEY);
            for w in words {
                if bytes.len() == len * 4 {
                    break;
                }
                // u32 → [-2^31, 2^31) → [-spread, spread).
                let x = (i64::from(w) - (1i64 << 31)) as f32 * scale;
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            (block, high) = match block.checked_add(1) {
                Some(b) => (b, high),
                None => (0, high + 1),
            };
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.dims.iter().product::<usize>() * 4
    }
}

/// Streams one component's weights to `rel` under `dir`.
fn write_weights(
    dir: &Path,
    rel: &str,
    component: &str,
    shapes: BTreeMap<String, Vec<usize>>,
) -> Result<(), PipelineError> {
    let path = dir.join(rel);
    let tensors = shapes.into_iter().map(|(name, dims)| {
        let tensor = LazyTensor::new(component, &name, dims);
        (name, tensor)
    });
    safetensors::serialize_to_file(tensors, None, &path).map_err(|e| PipelineError::Weights {
        file: path.clone(),
        message: format!("cannot write: {e}"),
    })
}

/// Writes pretty JSON with a trailing newline.
fn write_json(dir: &Path, rel: &str, value: &Value) -> Result<(), PipelineError> {
    let path = dir.join(rel);
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| PipelineError::config(&path, e.to_string()))?;
    text.push('\n');
    std::fs::write(&path, text).map_err(|e| PipelineError::io(path, e))
}

#[cfg(test)]
mod tests {
    use safetensors::View;

    use super::*;

    #[test]
    fn lazy_tensors_are_deterministic_and_scaled() {
        let a = LazyTensor::new("unet", "conv_in.weight", vec![320, 4, 3, 3]);
        let b = LazyTensor::new("unet", "conv_in.weight", vec![320, 4, 3, 3]);
        assert_eq!(a.data(), b.data());
        assert_eq!(a.data().len(), a.data_len());
        let values: Vec<f32> = a
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let var = values.iter().map(|x| x * x).sum::<f32>() / values.len() as f32;
        // Variance 1 / fan_in = 1 / 36, within sampling error.
        assert!((var * 36.0 - 1.0).abs() < 0.1, "variance {var}");
        let ones = LazyTensor::new("unet", "conv_norm_out.weight", vec![320]);
        assert!(ones.data().chunks_exact(4).all(|c| c == 1f32.to_le_bytes()));
    }

    #[test]
    fn the_sd15_unet_has_the_real_parameter_count() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("config.json");
        std::fs::write(&path, unet_config().to_string())?;
        let unet = config::read_unet(&path)?;
        let shapes = parameter_shapes(|vb| Unet::new(vb, &unet).map(drop))?;
        let count: usize = shapes.values().map(|d| d.iter().product::<usize>()).sum();
        // diffusers: UNet2DConditionModel of SD 1.5 has 859,520,964 parameters.
        assert_eq!(count, 859_520_964);
        assert!(
            shapes
                .contains_key("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
        );
        Ok(())
    }
}
