//! The tiny models: every supported architecture with deterministic random weights.
//!
//! Tests and the quickstart render with them. Each is written in exactly the
//! diffusers layout, file names, config keys and tensor names of its real
//! counterpart ([`TinyKind`]: SD 1.5, SD 2.1, SDXL, SD 1.5 inpainting), so it
//! exercises the real loader. Sizes (FIELD-NOTES): UNet levels of 32 and 64
//! channels, 8 norm groups; VAE channels [16, 16, 32, 32] (four blocks keep
//! the real 8× latent factor); CLIP width 32 (SDXL's second encoder 48),
//! 2 layers, 4 heads, 77 positions. The configs are in `tiny_configs`.
//!
//! The modules are built on a `VarMap` only to enumerate every parameter's name
//! and shape: its own initial values come from an unseeded generator and are
//! never saved. Each saved tensor is generated from the portable Philox stream
//! keyed by a hash of the component and tensor name: norm scales 1, biases
//! N(0, 0.02²), embedding tables N(0, 1), other weights N(0, 1/fan_in), with
//! the cross-attention query and key weights doubled. That keeps activations in
//! range through every layer, so images are neither black nor saturated and
//! visibly change with prompt and seed. The bytes written are identical on
//! every run, and the SD 1.5 kind's are those kiln has always written.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::clip::ClipTextModel;
use super::config;
use super::error::PipelineError;
use super::layout::{self, TEXT_1, TEXT_2, TextComponent};
use super::noise::{self, Purpose};
use super::tiny_configs;
use super::tiny_tokenizer::{self, TinyVocab};
use super::unet::Unet;

/// Philox seed of the tiny model's weights ("kiln" in ASCII).
const WEIGHTS_SEED: u64 = 0x6b69_6c6e;
/// Gain of the UNet's cross-attention query and key weights. At 1 the attention
/// logits have unit spread and each pixel averages all 77 text tokens, so the
/// prompt barely shows (mean byte difference ~15 between two prompts); at 2 the
/// logits spread 4× wider, attention picks out tokens as a trained model's does,
/// and the difference is ~40 (a new seed: ~70).
const CROSS_ATTENTION_QK_GAIN: f32 = 2.0;

/// The architecture of a tiny model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TinyKind {
    /// Stable Diffusion 1.5: one QuickGELU CLIP encoder, ε-prediction (`sd15`).
    #[default]
    Sd15,
    /// Stable Diffusion 2.1 (768, v-prediction): a GELU OpenCLIP encoder padded with `!`,
    /// per-level head counts, linear attention projections (`sd21`).
    Sd21,
    /// SDXL: two text encoders and the UNet's added conditioning (`sdxl`).
    Sdxl,
    /// SD 1.5 inpainting: a UNet with 9 input channels (`inpaint`).
    Inpaint,
}

impl TinyKind {
    /// Every kind, in the order `kiln model tiny --help` lists them.
    pub const ALL: [TinyKind; 4] = [
        TinyKind::Sd15,
        TinyKind::Sd21,
        TinyKind::Sdxl,
        TinyKind::Inpaint,
    ];

    /// Returns the kind's command-line name: `sd15`, `sd21`, `sdxl` or `inpaint`.
    pub fn name(self) -> &'static str {
        match self {
            TinyKind::Sd15 => "sd15",
            TinyKind::Sd21 => "sd21",
            TinyKind::Sdxl => "sdxl",
            TinyKind::Inpaint => "inpaint",
        }
    }

    /// Returns the text encoder / tokenizer folders the kind has.
    fn text_components(self) -> &'static [TextComponent] {
        match self {
            TinyKind::Sdxl => &[TEXT_1, TEXT_2],
            _ => &[TEXT_1],
        }
    }
}

impl fmt::Display for TinyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tiny model kind name that is not one of `sd15`, `sd21`, `sdxl`, `inpaint`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown tiny model kind {0:?}: expected sd15, sd21, sdxl or inpaint")]
pub struct ParseTinyKindError(pub String);

impl FromStr for TinyKind {
    type Err = ParseTinyKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TinyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| ParseTinyKindError(s.to_string()))
    }
}

/// Writes the tiny SD 1.5 model (deterministic: same bytes every time) into `dir`.
///
/// # Errors
///
/// `Io` when a folder or file cannot be written; `Config` or `Weights` only if
/// kiln's own tiny configs were inconsistent.
pub fn write_tiny_model(dir: &Path) -> Result<(), PipelineError> {
    write_tiny_model_kind(dir, TinyKind::Sd15)
}

/// Writes the tiny model of architecture `kind` (deterministic) into `dir`.
///
/// # Errors
///
/// As [`write_tiny_model`].
pub fn write_tiny_model_kind(dir: &Path, kind: TinyKind) -> Result<(), PipelineError> {
    let folders = ["scheduler", "unet", "vae"].into_iter().chain(
        kind.text_components()
            .iter()
            .flat_map(|c| [c.encoder, c.tokenizer]),
    );
    for sub in folders {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|e| PipelineError::io(path, e))?;
    }
    write_json(dir, layout::MODEL_INDEX, &tiny_configs::model_index(kind))?;
    write_json(
        dir,
        layout::SCHEDULER_CONFIG,
        &tiny_configs::scheduler_config(kind),
    )?;

    let vocab = TinyVocab::new();
    for (index, &component) in kind.text_components().iter().enumerate() {
        let pad = tiny_configs::pad_token(kind, index);
        let file = |name: &str| component.tokenizer_file(name);
        write_json(dir, &file("tokenizer.json"), &vocab.tokenizer_json())?;
        write_json(dir, &file("vocab.json"), &vocab.vocab_json())?;
        write_text(dir, &file("merges.txt"), &vocab.merges_txt())?;
        write_json(
            dir,
            &file("tokenizer_config.json"),
            &tiny_tokenizer::tokenizer_config_json(pad),
        )?;
        write_json(
            dir,
            &file("special_tokens_map.json"),
            &tiny_tokenizer::special_tokens_map_json(pad),
        )?;

        // Each component is built from the config file just written, read back by the
        // loader's own parser, so the weights always match what the loader will expect.
        let config_rel = component.config();
        write_json(
            dir,
            &config_rel,
            &tiny_configs::text_encoder_config(kind, index, &vocab),
        )?;
        let clip = config::read_clip(&dir.join(&config_rel), index == 1)?;
        let tensors = random_weights(component.encoder, |vb| {
            ClipTextModel::new(vb, &clip).map(drop)
        })?;
        save(dir, &component.weights(), &tensors)?;
    }

    write_json(dir, layout::UNET_CONFIG, &tiny_configs::unet_config(kind))?;
    let unet = config::read_unet(&dir.join(layout::UNET_CONFIG))?;
    let tensors = random_weights("unet", |vb| Unet::new(vb, &unet).map(drop))?;
    save(dir, layout::UNET_WEIGHTS, &tensors)?;

    write_json(dir, layout::VAE_CONFIG, &tiny_configs::vae_config(kind))?;
    let vae = config::read_vae(&dir.join(layout::VAE_CONFIG))?;
    let tensors = random_weights("vae", |vb| {
        AutoEncoderKL::new(vb, vae.in_channels, vae.out_channels, vae.config.clone()).map(drop)
    })?;
    save(dir, layout::VAE_WEIGHTS, &tensors)?;
    Ok(())
}

/// Builds a module on a `VarMap` and returns deterministic values for all its parameters,
/// under the tensor names real checkpoints use.
pub(crate) fn random_weights(
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
pub(crate) fn diffusers_name(name: &str) -> String {
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
pub(crate) fn write_json(dir: &Path, rel: &str, value: &Value) -> Result<(), PipelineError> {
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
pub(crate) fn save(
    dir: &Path,
    rel: &str,
    tensors: &HashMap<String, Tensor>,
) -> Result<(), PipelineError> {
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

    /// Every file under `dir`, relative, sorted.
    fn files(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(dir) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in TinyKind::ALL {
            assert_eq!(kind.to_string().parse::<TinyKind>(), Ok(kind));
        }
        assert_eq!(TinyKind::default(), TinyKind::Sd15);
        let err = "sd3".parse::<TinyKind>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("unknown tiny model kind \"sd3\": expected sd15, sd21, sdxl or inpaint")
        );
    }

    #[test]
    fn writes_the_same_bytes_every_time() -> Result<(), Box<dyn std::error::Error>> {
        for kind in TinyKind::ALL {
            let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
            write_tiny_model_kind(a.path(), kind)?;
            write_tiny_model_kind(b.path(), kind)?;
            let listed = files(a.path());
            assert_eq!(listed, files(b.path()));
            let expected = if kind == TinyKind::Sdxl { 20 } else { 13 };
            assert_eq!(listed.len(), expected, "{kind}: {listed:?}");
            for rel in listed {
                let (x, y) = (
                    std::fs::read(a.path().join(&rel))?,
                    std::fs::read(b.path().join(&rel))?,
                );
                assert!(!x.is_empty(), "{kind}: {rel} is empty");
                println!("{kind} {rel}: {} bytes", x.len());
                assert!(x == y, "{kind}: {rel} differs between two writes");
            }
        }
        Ok(())
    }

    /// The SD 1.5 tiny model is the one kiln has always written, byte for byte: its
    /// content hash (over every file the pipeline reads) is pinned here.
    #[test]
    fn the_sd15_tiny_model_never_changes() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        write_tiny_model(dir.path())?;
        assert_eq!(
            super::super::model_hash(dir.path())?,
            "ac7f8adb8db1d38471c3599d8a23e55ee1300c1c714ac979307477c9d2bad965"
        );
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

    #[test]
    fn sdxl_has_both_encoders_and_the_added_embedding() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        write_tiny_model_kind(dir.path(), TinyKind::Sdxl)?;
        let load = |rel: &str| candle_core::safetensors::load(dir.path().join(rel), &Device::Cpu);
        let unet = load(layout::UNET_WEIGHTS)?;
        let linear_1 = unet
            .get("add_embedding.linear_1.weight")
            .ok_or("no add_embedding.linear_1.weight")?;
        // 40 (pooled projection) + 6 time ids × 32 in, 4 × 32 (time embedding) out.
        assert_eq!(linear_1.dims(), [128, 232]);
        assert!(unet.contains_key("add_embedding.linear_2.bias"));
        // SDXL's first level has no attention; the second has two transformer layers.
        assert!(
            !unet
                .keys()
                .any(|n| n.starts_with("down_blocks.0.attentions"))
        );
        assert!(
            unet.contains_key("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k.weight")
        );
        assert!(unet.contains_key("mid_block.attentions.0.transformer_blocks.1.norm3.weight"));
        let second = load(&TEXT_2.weights())?;
        assert_eq!(
            second
                .get("text_projection.weight")
                .ok_or("no text_projection")?
                .dims(),
            [40, 48]
        );
        let first = load(&TEXT_1.weights())?;
        assert!(!first.contains_key("text_projection.weight"));
        let pad: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            dir.path()
                .join(TEXT_2.tokenizer_file("tokenizer_config.json")),
        )?)?;
        assert_eq!(pad["pad_token"], "!");
        Ok(())
    }
}
