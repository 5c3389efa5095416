//! Where a diffusers-layout model folder keeps each file the pipeline reads.
//!
//! The loader, the content hash and the tiny-model writer all take their paths
//! from here, so the hash covers exactly the files a render depends on. Which
//! optional components exist (SDXL's `text_encoder_2` and `tokenizer_2`)
//! comes from `model_index.json`.

use std::path::{Path, PathBuf};

use super::config::ModelIndex;
use super::error::PipelineError;

/// The pipeline's manifest: names the component folders.
pub(crate) const MODEL_INDEX: &str = "model_index.json";
/// Scheduler parameters (beta schedule, timestep spacing, prediction type).
pub(crate) const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
// The first text encoder's and tokenizer's files, by name for tests; the pipeline
// derives them from `TEXT_1`, and a test checks that both agree.
/// CLIP text encoder architecture.
#[cfg(test)]
pub(crate) const TEXT_ENCODER_CONFIG: &str = "text_encoder/config.json";
/// CLIP text encoder weights.
#[cfg(test)]
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
#[cfg(test)]
pub(crate) const TOKENIZER_JSON: &str = "tokenizer/tokenizer.json";
/// BPE vocabulary, as diffusers repos ship it.
#[cfg(test)]
pub(crate) const TOKENIZER_VOCAB: &str = "tokenizer/vocab.json";
/// BPE merges, as diffusers repos ship them.
#[cfg(test)]
pub(crate) const TOKENIZER_MERGES: &str = "tokenizer/merges.txt";
/// transformers' tokenizer settings; kiln reads the pad token from it.
#[cfg(test)]
pub(crate) const TOKENIZER_CONFIG: &str = "tokenizer/tokenizer_config.json";
/// The special-token list diffusers repos ship beside the tokenizer (not read).
#[cfg(test)]
pub(crate) const SPECIAL_TOKENS_MAP: &str = "tokenizer/special_tokens_map.json";

/// A text encoder folder and the tokenizer folder that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TextComponent {
    /// `text_encoder` or `text_encoder_2`: also the `model_index.json` key.
    pub(crate) encoder: &'static str,
    /// `tokenizer` or `tokenizer_2`.
    pub(crate) tokenizer: &'static str,
}

/// Every pipeline's text encoder; the only one of SD 1.x and 2.x.
pub(crate) const TEXT_1: TextComponent = TextComponent {
    encoder: "text_encoder",
    tokenizer: "tokenizer",
};
/// SDXL's second text encoder (OpenCLIP ViT-bigG with projection).
pub(crate) const TEXT_2: TextComponent = TextComponent {
    encoder: "text_encoder_2",
    tokenizer: "tokenizer_2",
};

impl TextComponent {
    /// The encoder's `config.json`.
    pub(crate) fn config(self) -> String {
        format!("{}/config.json", self.encoder)
    }

    /// The encoder's full-precision weights.
    pub(crate) fn weights(self) -> String {
        format!("{}/model.safetensors", self.encoder)
    }

    /// A file of the tokenizer folder, e.g. `vocab.json`.
    pub(crate) fn tokenizer_file(self, name: &str) -> String {
        format!("{}/{name}", self.tokenizer)
    }
}

/// Where the tokenizer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TokenizerSource {
    /// `tokenizer.json`.
    Json,
    /// `vocab.json` + `merges.txt`, assembled with CLIP's settings.
    VocabMerges,
}

/// The files of one text encoder and its tokenizer.
#[derive(Clone, Debug)]
pub(crate) struct TextFiles {
    /// Which folders.
    pub(crate) component: TextComponent,
    /// Which tokenizer files are used.
    pub(crate) tokenizer: TokenizerSource,
    /// Whether `tokenizer_config.json` exists (it is optional).
    pub(crate) has_tokenizer_config: bool,
    /// The weights actually present (full precision preferred).
    pub(crate) weights: String,
}

impl TextFiles {
    /// Finds the files of `component` under `root`.
    fn locate(root: &Path, component: TextComponent) -> Result<Self, PipelineError> {
        let config = root.join(component.config());
        std::fs::metadata(&config).map_err(|e| PipelineError::io(config, e))?;
        let file = |name: &str| root.join(component.tokenizer_file(name));
        let tokenizer = if file("tokenizer.json").is_file() {
            TokenizerSource::Json
        } else if file("vocab.json").is_file() && file("merges.txt").is_file() {
            TokenizerSource::VocabMerges
        } else {
            return Err(PipelineError::Tokenizer {
                path: root.join(component.tokenizer),
                message: "found neither tokenizer.json nor vocab.json + merges.txt".into(),
            });
        };
        Ok(Self {
            component,
            tokenizer,
            has_tokenizer_config: file("tokenizer_config.json").is_file(),
            weights: weights_file(root, &component.weights())?,
        })
    }

    /// The encoder's `config.json`, relative to the model folder.
    pub(crate) fn config(&self) -> String {
        self.component.config()
    }

    /// Returns the relative paths of the files read for this encoder and tokenizer.
    fn read_set(&self) -> Vec<String> {
        let mut files = vec![self.config(), self.weights.clone()];
        let c = self.component;
        match self.tokenizer {
            TokenizerSource::Json => files.push(c.tokenizer_file("tokenizer.json")),
            TokenizerSource::VocabMerges => {
                files.push(c.tokenizer_file("vocab.json"));
                files.push(c.tokenizer_file("merges.txt"));
            }
        }
        if self.has_tokenizer_config {
            files.push(c.tokenizer_file("tokenizer_config.json"));
        }
        files
    }
}

/// The files of one model folder that the pipeline reads, relative to its root.
#[derive(Clone, Debug)]
pub(crate) struct ModelFiles {
    /// The model folder.
    root: PathBuf,
    /// The text encoders `model_index.json` lists, `text_encoder` first.
    pub(crate) text: Vec<TextFiles>,
    /// The UNet weights actually present.
    pub(crate) unet_weights: String,
    /// The VAE weights actually present.
    pub(crate) vae_weights: String,
}

impl ModelFiles {
    /// Finds every file a render needs under `root`; the error names the first one missing.
    pub(crate) fn locate(root: &Path) -> Result<Self, PipelineError> {
        for rel in [MODEL_INDEX, SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG] {
            let path = root.join(rel);
            std::fs::metadata(&path).map_err(|e| PipelineError::io(path, e))?;
        }
        let index = ModelIndex::read(&root.join(MODEL_INDEX))?;
        let mut text = Vec::with_capacity(2);
        for component in [TEXT_1, TEXT_2] {
            if index.component(component.encoder).is_some() {
                text.push(TextFiles::locate(root, component)?);
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            text,
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
        let mut files: Vec<String> = [MODEL_INDEX, SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG]
            .iter()
            .map(|s| s.to_string())
            .collect();
        files.extend([self.unet_weights.clone(), self.vae_weights.clone()]);
        for t in &self.text {
            files.extend(t.read_set());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_text_component_matches_the_constants() {
        assert_eq!(TEXT_1.config(), TEXT_ENCODER_CONFIG);
        assert_eq!(TEXT_1.weights(), TEXT_ENCODER_WEIGHTS);
        assert_eq!(TEXT_1.tokenizer_file("tokenizer.json"), TOKENIZER_JSON);
        assert_eq!(TEXT_1.tokenizer_file("vocab.json"), TOKENIZER_VOCAB);
        assert_eq!(TEXT_1.tokenizer_file("merges.txt"), TOKENIZER_MERGES);
        assert_eq!(
            TEXT_1.tokenizer_file("tokenizer_config.json"),
            TOKENIZER_CONFIG
        );
        assert_eq!(
            TEXT_1.tokenizer_file("special_tokens_map.json"),
            SPECIAL_TOKENS_MAP
        );
        assert_eq!(TEXT_2.config(), "text_encoder_2/config.json");
    }
}
