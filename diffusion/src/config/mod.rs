//! Reads the diffusers / transformers config files of a model folder into kiln's model configs.
//!
//! The architecture always comes from the folder's own files, never from its
//! name: `model_index.json` names the components and their classes,
//! `unet/config.json` says whether the UNet takes SDXL's added conditioning
//! (`addition_embed_type`) or inpainting inputs (`in_channels`), each text
//! encoder's `config.json` its activation and sizes. Missing keys take the
//! defaults of the diffusers or transformers class that wrote the file, as
//! `from_config` would; a key describing something kiln cannot run correctly
//! is refused with a [`PipelineError::Config`] naming the file and the key,
//! never ignored.
//!
//! Files: this one (shared helpers, `model_index.json`, the checks across
//! components), `unet`, `vae` and `clip` (one per component config).

mod clip;
mod unet;
mod vae;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::clip::{ClipConfig, Layer};
use super::error::PipelineError;
use super::layout::{self, ModelFiles};
use super::unet::UnetConfig;

pub(crate) use clip::read_clip;
pub(crate) use unet::{read_unet, unet_config};
pub(crate) use vae::{VaeSpec, read_vae};

/// Number of SDXL time ids: original size (h, w), crop top-left (y, x), target size (h, w).
pub(crate) const SDXL_TIME_IDS: usize = 6;

/// Parses a JSON config file into `T`.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| PipelineError::config(path, format!("invalid: {e}")))
}

/// The top-level keys of one JSON config file; every error names the file and the key.
pub(crate) struct Keys {
    /// The file, for errors.
    path: PathBuf,
    /// Its top-level object.
    map: serde_json::Map<String, Value>,
}

impl Keys {
    /// Reads a config file, which must hold a JSON object.
    pub(crate) fn read(path: &Path) -> Result<Self, PipelineError> {
        Self::parse(
            path,
            &std::fs::read_to_string(path).map_err(|e| PipelineError::io(path, e))?,
        )
    }

    /// Parses config text; `path` only names it in errors.
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, PipelineError> {
        match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(Self {
                path: path.to_path_buf(),
                map,
            }),
            Ok(_) => Err(PipelineError::config(path, "is not a JSON object")),
            Err(e) => Err(PipelineError::config(path, format!("invalid: {e}"))),
        }
    }

    /// Returns the value of `key`, `None` when it is absent or null.
    pub(crate) fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, PipelineError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| self.error(format!("{key} = {v}: {e}"))),
        }
    }

    /// Returns the value of `key`, or `default` when it is absent or null.
    pub(crate) fn or<T: DeserializeOwned>(
        &self,
        key: &str,
        default: T,
    ) -> Result<T, PipelineError> {
        Ok(self.get(key)?.unwrap_or(default))
    }

    /// Returns the raw value of `key`, distinguishing absent (`None`) from null.
    pub(crate) fn raw(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// Returns a one-value-or-list key expanded to `n` values.
    pub(crate) fn per_block(
        &self,
        key: &str,
        n: usize,
        default: usize,
    ) -> Result<Vec<usize>, PipelineError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(vec![default; n]),
            Some(Value::Array(values)) => {
                if values.len() != n {
                    return Err(self.error(format!(
                        "{key} has {} entries but there are {n} blocks",
                        values.len()
                    )));
                }
                values
                    .iter()
                    .map(|v| {
                        v.as_u64().map(|x| x as usize).ok_or_else(|| {
                            self.error(format!("{key}: {v} is not a non-negative integer"))
                        })
                    })
                    .collect()
            }
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as usize; n])
                .ok_or_else(|| self.error(format!("{key} = {v}: expected a number or a list"))),
        }
    }

    /// Returns a [`PipelineError::Config`] about this file.
    pub(crate) fn error(&self, message: impl Into<String>) -> PipelineError {
        PipelineError::config(&self.path, message)
    }

    /// Refuses `key` unless it is absent, null or `neutral`: a feature kiln does not run.
    pub(crate) fn refuse_unless(
        &self,
        key: &str,
        neutral: &[Value],
        what: &str,
    ) -> Result<(), PipelineError> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(()),
            Some(v) if neutral.contains(v) => Ok(()),
            Some(v) => Err(self.error(format!("{key} = {v}: {what} is not supported"))),
        }
    }
}

/// `model_index.json`: the pipeline's components and settings.
#[derive(Clone, Debug)]
pub(crate) struct ModelIndex {
    /// The file, for errors.
    path: PathBuf,
    /// Component → its class (`None` for `[null, null]`, an absent component).
    components: BTreeMap<String, Option<String>>,
    /// SDXL: an empty negative prompt means zero conditioning rather than encoded "".
    pub(crate) force_zeros_for_empty_prompt: Option<bool>,
}

impl ModelIndex {
    /// Reads `model_index.json`.
    pub(crate) fn read(path: &Path) -> Result<Self, PipelineError> {
        let keys = Keys::read(path)?;
        // The pipeline class is only checked for presence: the components' configs, not
        // the class name, decide the architecture.
        if keys
            .get::<String>("_class_name")?
            .is_none_or(|name| name.is_empty())
        {
            return Err(keys.error("_class_name is missing: not a diffusers model_index.json"));
        }
        let mut components = BTreeMap::new();
        for (key, value) in &keys.map {
            if key.starts_with('_') {
                continue;
            }
            // Components are [library, class] pairs; other keys are pipeline settings.
            if let Value::Array(pair) = value
                && pair.len() == 2
            {
                components.insert(key.clone(), pair[1].as_str().map(str::to_string));
            }
        }
        if keys.get::<bool>("requires_aesthetics_score")? == Some(true) {
            return Err(keys.error(
                "requires_aesthetics_score = true (the SDXL refiner's conditioning) is not supported",
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            components,
            force_zeros_for_empty_prompt: keys.get("force_zeros_for_empty_prompt")?,
        })
    }

    /// Returns the class of a component, `None` when it is absent or null.
    pub(crate) fn component(&self, name: &str) -> Option<&str> {
        self.components.get(name).and_then(|c| c.as_deref())
    }

    /// Checks that `name` is present with one of `classes`.
    fn expect(&self, name: &str, classes: &[&str], why: &str) -> Result<(), PipelineError> {
        match self.component(name) {
            Some(class) if classes.contains(&class) => Ok(()),
            Some(class) => Err(PipelineError::config(
                &self.path,
                format!("{name} is a {class}: expected {}", classes.join(" or ")),
            )),
            None => Err(PipelineError::config(
                &self.path,
                format!("{name} is missing or null: {why}"),
            )),
        }
    }
}

/// One text encoder as a pipeline uses it.
#[derive(Clone, Debug)]
pub(crate) struct TextSpec {
    /// Its architecture.
    pub(crate) config: ClipConfig,
    /// Which hidden states condition the UNet.
    pub(crate) layer: Layer,
}

/// Everything `Pipeline::load` builds, read and cross-checked.
#[derive(Clone, Debug)]
pub(crate) struct ModelSpec {
    /// One text encoder (SD 1.x, 2.x) or two (SDXL), in `text_encoder`, `text_encoder_2` order.
    pub(crate) text: Vec<TextSpec>,
    /// The UNet.
    pub(crate) unet: UnetConfig,
    /// The VAE.
    pub(crate) vae: VaeSpec,
    /// Whether the UNet also takes mask and masked-image latents (`in_channels = 2 × latent + 1`).
    pub(crate) inpainting: bool,
    /// SDXL: an empty negative prompt conditions on zeros (diffusers' default for SDXL).
    pub(crate) zero_empty_negative: bool,
}

/// Reads every config of a located model folder and checks that the components fit together.
pub(crate) fn read_model(files: &ModelFiles) -> Result<ModelSpec, PipelineError> {
    let index_path = files.path(layout::MODEL_INDEX);
    let index = ModelIndex::read(&index_path)?;
    index.expect(
        "unet",
        &["UNet2DConditionModel"],
        "kiln renders UNet models",
    )?;
    index.expect("vae", &["AutoencoderKL"], "kiln decodes with a KL VAE")?;
    index.expect(
        "text_encoder",
        &["CLIPTextModel"],
        "pipelines without the first text encoder (the SDXL refiner) are not supported",
    )?;
    let sdxl = files.text.len() == 2;
    if sdxl {
        index.expect(
            "text_encoder_2",
            &["CLIPTextModelWithProjection"],
            "SDXL reads its pooled embedding",
        )?;
    }

    let unet_path = files.path(layout::UNET_CONFIG);
    let unet = read_unet(&unet_path)?;
    let vae_path = files.path(layout::VAE_CONFIG);
    let vae = read_vae(&vae_path)?;
    let layer = if sdxl {
        Layer::Penultimate
    } else {
        Layer::Last
    };
    let mut text = Vec::with_capacity(files.text.len());
    for (i, t) in files.text.iter().enumerate() {
        // Only SDXL's second encoder contributes a pooled, projected embedding.
        let projected = sdxl && i == 1;
        text.push(TextSpec {
            config: read_clip(&files.path(&t.config()), projected)?,
            layer,
        });
    }

    let unet_error = |message: String| PipelineError::config(&unet_path, message);
    match (unet.text_time, sdxl) {
        (Some(tt), true) => {
            let pooled = text[1].config.projection_dim.unwrap_or(0);
            let expected = pooled + SDXL_TIME_IDS * tt.time_embed_dim;
            if tt.input_dim != expected {
                return Err(unet_error(format!(
                    "projection_class_embeddings_input_dim = {} but the pooled text ({pooled}) \
                     and {SDXL_TIME_IDS} time ids of addition_time_embed_dim = {} make {expected} \
                     (the SDXL refiner's 5 time ids are not supported)",
                    tt.input_dim, tt.time_embed_dim
                )));
            }
        }
        (None, false) => {}
        (Some(_), false) => {
            return Err(unet_error(
                "addition_embed_type = \"text_time\" needs SDXL's second text encoder, \
                 but model_index.json lists no text_encoder_2"
                    .into(),
            ));
        }
        (None, true) => {
            return Err(PipelineError::config(
                &index_path,
                "text_encoder_2 is listed but unet/config.json has no addition_embed_type = \"text_time\"",
            ));
        }
    }

    let widths: Vec<usize> = text.iter().map(|t| t.config.hidden_size).collect();
    let context: usize = widths.iter().sum();
    if unet.cross_attention_dim != context {
        return Err(unet_error(format!(
            "cross_attention_dim = {} but the text encoders' hidden sizes {widths:?} add up to {context}",
            unet.cross_attention_dim
        )));
    }
    let latent = vae.config.latent_channels;
    if unet.out_channels != latent {
        return Err(unet_error(format!(
            "out_channels = {} must equal the VAE's latent_channels = {latent}",
            unet.out_channels
        )));
    }
    let inpainting = if unet.in_channels == latent {
        false
    } else if unet.in_channels == 2 * latent + 1 {
        true
    } else {
        return Err(unet_error(format!(
            "in_channels = {}: kiln runs text-to-image UNets ({latent} channels) and inpainting \
             UNets ({} = latents, mask, masked-image latents)",
            unet.in_channels,
            2 * latent + 1
        )));
    };
    if vae.out_channels != 3 {
        return Err(PipelineError::config(
            &vae_path,
            format!(
                "out_channels = {}: kiln renders RGB images",
                vae.out_channels
            ),
        ));
    }
    Ok(ModelSpec {
        text,
        unet,
        vae,
        inpainting,
        // diffusers' StableDiffusionXLPipeline defaults force_zeros_for_empty_prompt to true.
        zero_empty_negative: sdxl && index.force_zeros_for_empty_prompt.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_file_and_key() {
        let path = Path::new("unet/config.json");
        let keys = Keys::parse(path, r#"{"a": "x", "b": [1, 2], "c": null, "d": 3}"#);
        let Ok(keys) = keys else {
            panic!("parses");
        };
        let err = keys.get::<usize>("a").err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.starts_with("unet/config.json: a = \"x\"")),
            "{err:?}"
        );
        assert_eq!(keys.get::<usize>("c").ok(), Some(None));
        assert_eq!(keys.per_block("b", 2, 0).ok(), Some(vec![1, 2]));
        assert_eq!(keys.per_block("d", 3, 0).ok(), Some(vec![3, 3, 3]));
        assert_eq!(keys.per_block("missing", 2, 8).ok(), Some(vec![8, 8]));
        let err = keys.per_block("b", 3, 0).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("b has 2 entries")),
            "{err:?}"
        );
        assert!(Keys::parse(path, "[1]").is_err());
    }
}
