//! Where a diffusers-layout model folder keeps each file the pipeline reads.
//!
//! The loader, the content hash and the tiny-model writer all take their paths
//! from here, so the hash covers exactly the files a render depends on.

use std::path::{Path, PathBuf};

use super::error::PipelineError;

/// The pipeline's manifest: names the component folders.
pub(crate) const MODEL_INDEX: &str = "model_index.json";
/// Scheduler parameters (beta schedule, timestep spacing, prediction type).
pub(crate) const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
/// CLIP text encoder architecture.
pub(crate) const TEXT_ENCODER_CONFIG: &str = "text_encoder/config.json";
/// CLIP text encoder weights.
pub(crate) const TEXT_ENCODER_WEIGHTS: &str = "text_encoder/model.safetensors";
/// UNet architecture.
pub(crate) const UNET_CONFIG: &str = "unet/config.json";
/// UNet weights.
pub(crate) const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";
/// VAE architecture and latent scaling factor.
pub(crate) const VAE_CONFIG: &str = "vae/config.json";
/// VAE weights.
pub(crate) const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";
/// A complete HF tokenizers pipeline; diffusers repos usually lack it.
pub(crate) const TOKENIZER_JSON: &str = "tokenizer/tokenizer.json";
/// BPE vocabulary, as diffusers repos ship it.
pub(crate) const TOKENIZER_VOCAB: &str = "tokenizer/vocab.json";
/// BPE merges, as diffusers repos ship them.
pub(crate) const TOKENIZER_MERGES: &str = "tokenizer/merges.txt";
/// transformers' tokenizer settings; kiln reads the pad token from it.
pub(crate) const TOKENIZER_CONFIG: &str = "tokenizer/tokenizer_config.json";
/// The special-token list diffusers repos ship beside the tokenizer (not read).
pub(crate) const SPECIAL_TOKENS_MAP: &str = "tokenizer/special_tokens_map.json";

/// Where the tokenizer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TokenizerSource {
    /// `tokenizer/tokenizer.json`.
    Json,
    /// `tokenizer/vocab.json` + `tokenizer/merges.txt`, assembled with CLIP's settings.
    VocabMerges,
}

/// The files of one model folder that the pipeline reads, relative to its root.
#[derive(Clone, Debug)]
pub(crate) struct ModelFiles {
    /// The model folder.
    root: PathBuf,
    /// Which tokenizer files are used.
    pub(crate) tokenizer: TokenizerSource,
    /// Whether `tokenizer_config.json` exists (it is optional).
    pub(crate) has_tokenizer_config: bool,
    /// The text encoder weights actually present (full precision preferred).
    pub(crate) text_encoder_weights: String,
    /// The UNet weights actually present.
    pub(crate) unet_weights: String,
    /// The VAE weights actually present.
    pub(crate) vae_weights: String,
}

impl ModelFiles {
    /// Finds every file a render needs under `root`; the error names the first one missing.
    pub(crate) fn locate(root: &Path) -> Result<Self, PipelineError> {
        for rel in [
            MODEL_INDEX,
            SCHEDULER_CONFIG,
            TEXT_ENCODER_CONFIG,
            UNET_CONFIG,
            VAE_CONFIG,
        ] {
            let path = root.join(rel);
            std::fs::metadata(&path).map_err(|e| PipelineError::io(path, e))?;
        }
        let tokenizer = if root.join(TOKENIZER_JSON).is_file() {
            TokenizerSource::Json
        } else if root.join(TOKENIZER_VOCAB).is_file() && root.join(TOKENIZER_MERGES).is_file() {
            TokenizerSource::VocabMerges
        } else {
            return Err(PipelineError::Tokenizer {
                path: root.join("tokenizer"),
                message: "found neither tokenizer.json nor vocab.json + merges.txt".into(),
            });
        };
        Ok(Self {
            root: root.to_path_buf(),
            tokenizer,
            has_tokenizer_config: root.join(TOKENIZER_CONFIG).is_file(),
            text_encoder_weights: weights_file(root, TEXT_ENCODER_WEIGHTS)?,
            unet_weights: weights_file(root, UNET_WEIGHTS)?,
            vae_weights: weights_file(root, VAE_WEIGHTS)?,
        })
    }

    /// Returns the absolute path of a file given relative to the model folder.
    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Returns the relative paths of every file the pipeline reads, sorted.
    pub(crate) fn read_set(&self) -> Vec<String> {
        let mut files: Vec<String> = [
            MODEL_INDEX,
            SCHEDULER_CONFIG,
            TEXT_ENCODER_CONFIG,
            UNET_CONFIG,
            VAE_CONFIG,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        files.extend([
            self.text_encoder_weights.clone(),
            self.unet_weights.clone(),
            self.vae_weights.clone(),
        ]);
        match self.tokenizer {
            TokenizerSource::Json => files.push(TOKENIZER_JSON.into()),
            TokenizerSource::VocabMerges => {
                files.push(TOKENIZER_VOCAB.into());
                files.push(TOKENIZER_MERGES.into());
            }
        }
        if self.has_tokenizer_config {
            files.push(TOKENIZER_CONFIG.into());
        }
        files.sort();
        files
    }
}

/// Returns the weights file to read: `name`, or else its `.fp16` variant.
fn weights_file(root: &Path, name: &str) -> Result<String, PipelineError> {
    if root.join(name).is_file() {
        return Ok(name.to_string());
    }
    let fp16 = name.replace(".safetensors", ".fp16.safetensors");
    if root.join(&fp16).is_file() {
        return Ok(fp16);
    }
    Err(PipelineError::Weights {
        file: root.join(name),
        message: format!(
            "not found (nor {fp16}); kiln reads single-file safetensors weights, \
             not .bin checkpoints or sharded files"
        ),
    })
}
