//! Which files of a diffusers repository on the Hugging Face hub a kiln
//! pipeline needs: the file selection behind `kiln model pull`.
//!
//! [`select`] is a pure function of the repository's file listing and its
//! `model_index.json`, so it is tested on the listings of real repositories
//! without a network. It takes the components `model_index.json` names and,
//! from each, only what the loader reads:
//!
//! - models (text encoders, UNet, VAE): `config.json` and one single-file
//!   safetensors weights file, full precision unless [`Variant::Fp16`] is asked;
//! - tokenizers: `tokenizer.json`, or else `vocab.json` + `merges.txt`, plus
//!   `tokenizer_config.json` and `special_tokens_map.json` when present;
//! - schedulers: `scheduler_config.json`.
//!
//! It never takes `.bin`, `.ckpt`, `.onnx`, OpenVINO or Flax files, the
//! repository's single-file checkpoints at the top level, EMA/non-EMA extras,
//! or the components kiln does not run (safety checker, feature extractor,
//! image encoder), nor folders `model_index.json` does not name (`vae_1_0/`).

use std::collections::{BTreeMap, BTreeSet};

/// The pipeline's manifest, fetched first: it names the components.
pub const MODEL_INDEX: &str = "model_index.json";

/// Components a diffusers pipeline may list that kiln never runs.
const SKIPPED_COMPONENTS: &[&str] = &["safety_checker", "feature_extractor", "image_encoder"];

/// Base names of single-file weights: diffusers models, then transformers models.
const WEIGHT_STEMS: &[&str] = &["diffusion_pytorch_model", "model"];

/// Which precision of the weights to download.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Variant {
    /// `*.safetensors`: full precision, the default.
    #[default]
    Full,
    /// `*.fp16.safetensors`: half the download; the loader reads it the same way.
    Fp16,
}

impl Variant {
    /// Parses `--variant`: `fp16`, or `fp32`/`full` for the default.
    ///
    /// # Errors
    /// Any other value, quoted.
    pub fn parse(value: &str) -> Result<Self, SelectError> {
        match value {
            "fp16" => Ok(Variant::Fp16),
            "fp32" | "full" => Ok(Variant::Full),
            other => Err(SelectError::Variant(other.to_string())),
        }
    }
}

/// The files to download and what the user should know about the choice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Paths in the repository, sorted; `model_index.json` included.
    pub files: Vec<String>,
    /// Remarks worth printing: skipped components, a variant that was missing.
    pub notes: Vec<String>,
}

/// Why a repository cannot be pulled as a kiln model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// The repository has no `model_index.json`: not in the diffusers layout.
    #[error(
        "the repository has no model_index.json: it is not in the diffusers layout \
         (single-file checkpoints such as .safetensors at the top level are not supported)"
    )]
    NoModelIndex,
    /// `model_index.json` is not the JSON object diffusers writes.
    #[error("model_index.json: {0}")]
    ModelIndex(String),
    /// A component lacks a file the pipeline needs.
    #[error("component {component:?}: {message}")]
    Component {
        /// The component's folder (`unet`, `tokenizer_2`).
        component: String,
        /// What is missing, listing what is there.
        message: String,
    },
    /// `--variant` has an unknown value.
    #[error("--variant must be fp16 or fp32, got {0:?}")]
    Variant(String),
}

/// How a component is fetched, by its class in `model_index.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tokenizer,
    Scheduler,
    Model,
}

/// Chooses the files to download from a repository `listing` (paths relative
/// to the repository root, as the hub's `siblings` list gives them), given the
/// text of its `model_index.json`.
///
/// # Errors
/// [`SelectError`] when the listing lacks `model_index.json`, the index is
/// malformed, or a component lacks its config, tokenizer files or a
/// single-file safetensors weights file.
pub fn select(
    listing: &[String],
    model_index: &str,
    variant: Variant,
) -> Result<Selection, SelectError> {
    if !listing.iter().any(|f| f == MODEL_INDEX) {
        return Err(SelectError::NoModelIndex);
    }
    let index: serde_json::Value = serde_json::from_str(model_index)
        .map_err(|e| SelectError::ModelIndex(format!("not valid JSON: {e}")))?;
    let index = index
        .as_object()
        .ok_or_else(|| SelectError::ModelIndex("is not a JSON object".into()))?;

    // Files of each top-level folder, by name within the folder (no deeper paths).
    let mut folders: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for path in listing {
        if let Some((folder, name)) = path.split_once('/')
            && !name.contains('/')
        {
            folders.entry(folder).or_default().insert(name);
        }
    }

    let mut files = BTreeSet::from([MODEL_INDEX.to_string()]);
    let mut notes = Vec::new();
    if let Some(class) = index.get("_class_name").and_then(|c| c.as_str())
        && !class.starts_with("StableDiffusion")
    {
        notes.push(format!(
            "model_index.json names the pipeline {class}; kiln runs Stable Diffusion pipelines"
        ));
    }
    for (component, value) in index {
        if component.starts_with('_') {
            continue;
        }
        // Components are ["library", "Class"]; [null, null] means absent.
        let Some(class) = value
            .as_array()
            .and_then(|pair| pair.get(1))
            .and_then(|c| c.as_str())
        else {
            continue;
        };
        if SKIPPED_COMPONENTS.contains(&component.as_str()) {
            notes.push(format!(
                "skipped {component} ({class}): kiln does not run it"
            ));
            continue;
        }
        let empty = BTreeSet::new();
        let present = folders.get(component.as_str()).unwrap_or(&empty);
        let kind = if class.contains("Tokenizer") {
            Kind::Tokenizer
        } else if class.ends_with("Scheduler") {
            Kind::Scheduler
        } else {
            Kind::Model
        };
        let chosen = match kind {
            Kind::Tokenizer => tokenizer_files(component, present)?,
            Kind::Scheduler => vec![require(component, present, "scheduler_config.json")?],
            Kind::Model => {
                let config = require(component, present, "config.json")?;
                let (weights, note) = weights_file(component, present, variant)?;
                notes.extend(note);
                vec![config, weights]
            }
        };
        files.extend(chosen.into_iter().map(|name| format!("{component}/{name}")));
    }
    Ok(Selection {
        files: files.into_iter().collect(),
        notes,
    })
}

/// Returns `name` if the component folder has it.
fn require(component: &str, present: &BTreeSet<&str>, name: &str) -> Result<String, SelectError> {
    if present.contains(name) {
        Ok(name.to_string())
    } else {
        Err(missing(component, present, &format!("has no {name}")))
    }
}

fn missing(component: &str, present: &BTreeSet<&str>, what: &str) -> SelectError {
    let found = if present.is_empty() {
        "the folder is empty or absent".to_string()
    } else {
        format!(
            "found {}",
            present.iter().copied().collect::<Vec<_>>().join(", ")
        )
    };
    SelectError::Component {
        component: component.to_string(),
        message: format!("{what} ({found})"),
    }
}

/// `tokenizer.json` if present (the loader prefers it), else `vocab.json` +
/// `merges.txt`; plus the optional settings files.
fn tokenizer_files(component: &str, present: &BTreeSet<&str>) -> Result<Vec<String>, SelectError> {
    let mut out = if present.contains("tokenizer.json") {
        vec!["tokenizer.json".to_string()]
    } else if present.contains("vocab.json") && present.contains("merges.txt") {
        vec!["vocab.json".to_string(), "merges.txt".to_string()]
    } else {
        return Err(missing(
            component,
            present,
            "has neither tokenizer.json nor vocab.json + merges.txt",
        ));
    };
    for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
        if present.contains(optional) {
            out.push(optional.to_string());
        }
    }
    Ok(out)
}

/// The one weights file of a model component, and a note when the asked
/// variant was missing and the other one is taken.
fn weights_file(
    component: &str,
    present: &BTreeSet<&str>,
    variant: Variant,
) -> Result<(String, Option<String>), SelectError> {
    for stem in WEIGHT_STEMS {
        let full = format!("{stem}.safetensors");
        let half = format!("{stem}.fp16.safetensors");
        let (want, other) = match variant {
            Variant::Full => (&full, &half),
            Variant::Fp16 => (&half, &full),
        };
        if present.contains(want.as_str()) {
            return Ok((want.clone(), None));
        }
        if present.contains(other.as_str()) {
            let note = format!("{component}: no {want}, taking {other}");
            return Ok((other.clone(), Some(note)));
        }
    }
    let sharded = present
        .iter()
        .any(|f| f.ends_with(".safetensors") && f.contains("-of-"));
    let what = if sharded {
        "has only sharded safetensors weights; kiln reads single-file weights"
    } else {
        "has no single-file .safetensors weights (kiln does not read .bin, .ckpt or .onnx)"
    };
    Err(missing(component, present, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    fn names(text: &str) -> Vec<String> {
        let mut v = listing(text);
        v.sort();
        v
    }

    /// stable-diffusion-v1-5/stable-diffusion-v1-5 (formerly runwayml/…).
    const SD15: &str = "
        .gitattributes README.md model_index.json
        feature_extractor/preprocessor_config.json
        safety_checker/config.json safety_checker/model.fp16.safetensors
        safety_checker/model.safetensors safety_checker/pytorch_model.bin
        safety_checker/pytorch_model.fp16.bin
        scheduler/scheduler_config.json
        text_encoder/config.json text_encoder/model.fp16.safetensors
        text_encoder/model.safetensors text_encoder/pytorch_model.bin
        text_encoder/pytorch_model.fp16.bin
        tokenizer/merges.txt tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json tokenizer/vocab.json
        unet/config.json unet/diffusion_pytorch_model.bin
        unet/diffusion_pytorch_model.fp16.bin unet/diffusion_pytorch_model.fp16.safetensors
        unet/diffusion_pytorch_model.non_ema.bin unet/diffusion_pytorch_model.non_ema.safetensors
        unet/diffusion_pytorch_model.safetensors
        v1-5-pruned-emaonly.ckpt v1-5-pruned-emaonly.safetensors
        v1-5-pruned.ckpt v1-5-pruned.safetensors v1-inference.yaml
        vae/config.json vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
        vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors";

    const SD15_INDEX: &str = r#"{
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    /// stabilityai/stable-diffusion-2-1: no safety checker, OpenCLIP text encoder.
    const SD21: &str = "
        .gitattributes README.md model_index.json
        feature_extractor/preprocessor_config.json
        scheduler/scheduler_config.json
        text_encoder/config.json text_encoder/model.fp16.safetensors
        text_encoder/model.safetensors text_encoder/pytorch_model.bin
        text_encoder/pytorch_model.fp16.bin
        tokenizer/merges.txt tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json tokenizer/vocab.json
        unet/config.json unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin
        unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.safetensors
        v2-1_768-ema-pruned.ckpt v2-1_768-ema-pruned.safetensors
        v2-1_768-nonema-pruned.ckpt v2-1_768-nonema-pruned.safetensors
        vae/config.json vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
        vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors";

    const SD21_INDEX: &str = r#"{
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.10.0.dev0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    /// stabilityai/stable-diffusion-xl-base-1.0: two encoders, ONNX, OpenVINO
    /// and Flax exports, and extra VAE folders the index does not name.
    const SDXL: &str = "
        .gitattributes 01.png LICENSE.md README.md comparison.png model_index.json pipeline.png
        scheduler/scheduler_config.json
        sd_xl_base_1.0.safetensors sd_xl_base_1.0_0.9vae.safetensors
        sd_xl_offset_example-lora_1.0.safetensors
        text_encoder/config.json text_encoder/flax_model.msgpack
        text_encoder/model.fp16.safetensors text_encoder/model.onnx
        text_encoder/model.safetensors text_encoder/openvino_model.bin
        text_encoder/openvino_model.xml
        text_encoder_2/config.json text_encoder_2/flax_model.msgpack
        text_encoder_2/model.fp16.safetensors text_encoder_2/model.onnx
        text_encoder_2/model.onnx_data text_encoder_2/model.safetensors
        text_encoder_2/openvino_model.bin text_encoder_2/openvino_model.xml
        tokenizer/merges.txt tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json tokenizer/vocab.json
        tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json
        tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
        unet/config.json unet/diffusion_flax_model.msgpack
        unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.onnx
        unet/diffusion_pytorch_model.onnx_data unet/diffusion_pytorch_model.safetensors
        unet/openvino_model.bin unet/openvino_model.xml
        vae/config.json vae/diffusion_flax_model.msgpack
        vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors
        vae_1_0/config.json vae_1_0/diffusion_pytorch_model.fp16.safetensors
        vae_1_0/diffusion_pytorch_model.safetensors
        vae_decoder/config.json vae_decoder/model.onnx vae_decoder/openvino_model.bin
        vae_decoder/openvino_model.xml
        vae_encoder/config.json vae_encoder/model.onnx vae_encoder/openvino_model.bin
        vae_encoder/openvino_model.xml";

    const SDXL_INDEX: &str = r#"{
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": true,
        "add_watermarker": null,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    /// stabilityai/sdxl-turbo: the SDXL layout with fp16 variants and
    /// top-level single-file checkpoints.
    const SDXL_TURBO: &str = "
        .gitattributes LICENSE.md README.md image_quality_one_step.png model_index.json
        output_tile.jpg prompt_alignment_one_step.png
        scheduler/scheduler_config.json
        sd_xl_turbo_1.0.safetensors sd_xl_turbo_1.0_fp16.safetensors
        text_encoder/config.json text_encoder/model.fp16.safetensors
        text_encoder/model.onnx text_encoder/model.safetensors
        text_encoder_2/config.json text_encoder_2/model.fp16.safetensors
        text_encoder_2/model.onnx text_encoder_2/model.onnx_data text_encoder_2/model.safetensors
        tokenizer/merges.txt tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json tokenizer/vocab.json
        tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json
        tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
        unet/config.json unet/diffusion_pytorch_model.fp16.safetensors
        unet/model.onnx unet/model.onnx_data unet/diffusion_pytorch_model.safetensors
        vae_decoder/config.json vae_decoder/model.onnx
        vae_encoder/config.json vae_encoder/model.onnx
        vae/config.json vae/diffusion_pytorch_model.fp16.safetensors
        vae/diffusion_pytorch_model.safetensors";

    const SDXL_TURBO_INDEX: &str = r#"{
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.24.0.dev0",
        "feature_extractor": [null, null],
        "force_zeros_for_empty_prompt": true,
        "image_encoder": [null, null],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    /// stable-diffusion-v1-5/stable-diffusion-inpainting (formerly runwayml/…).
    const INPAINT: &str = "
        .gitattributes README.md model_index.json sd-v1-5-inpainting.ckpt
        feature_extractor/preprocessor_config.json
        safety_checker/config.json safety_checker/model.fp16.safetensors
        safety_checker/model.safetensors safety_checker/pytorch_model.bin
        safety_checker/pytorch_model.fp16.bin
        scheduler/scheduler_config.json
        text_encoder/config.json text_encoder/model.fp16.safetensors
        text_encoder/model.safetensors text_encoder/pytorch_model.bin
        text_encoder/pytorch_model.fp16.bin
        tokenizer/merges.txt tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json tokenizer/vocab.json
        unet/config.json unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin
        unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.safetensors
        vae/config.json vae/diffusion_pytorch_model.bin vae/diffusion_pytorch_model.fp16.bin
        vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.safetensors";

    const INPAINT_INDEX: &str = r#"{
        "_class_name": "StableDiffusionInpaintPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    const SD_FILES: &str = "
        model_index.json scheduler/scheduler_config.json
        text_encoder/config.json text_encoder/model.safetensors
        tokenizer/merges.txt tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json tokenizer/vocab.json
        unet/config.json unet/diffusion_pytorch_model.safetensors
        vae/config.json vae/diffusion_pytorch_model.safetensors";

    const SDXL_FILES: &str = "
        model_index.json scheduler/scheduler_config.json
        text_encoder/config.json text_encoder/model.safetensors
        text_encoder_2/config.json text_encoder_2/model.safetensors
        tokenizer/merges.txt tokenizer/special_tokens_map.json
        tokenizer/tokenizer_config.json tokenizer/vocab.json
        tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json
        tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
        unet/config.json unet/diffusion_pytorch_model.safetensors
        vae/config.json vae/diffusion_pytorch_model.safetensors";

    fn fp16(files: &str) -> Vec<String> {
        let mut v: Vec<String> = listing(files)
            .into_iter()
            .map(|f| f.replace("model.safetensors", "model.fp16.safetensors"))
            .collect();
        v.sort();
        v
    }

    const REPOS: &[(&str, &str, &str, &str)] = &[
        ("sd15", SD15, SD15_INDEX, SD_FILES),
        ("sd21", SD21, SD21_INDEX, SD_FILES),
        ("sdxl", SDXL, SDXL_INDEX, SDXL_FILES),
        ("sdxl-turbo", SDXL_TURBO, SDXL_TURBO_INDEX, SDXL_FILES),
        ("inpainting", INPAINT, INPAINT_INDEX, SD_FILES),
    ];

    #[test]
    fn each_repo_gives_exactly_the_files_the_pipeline_reads() {
        for (name, list, index, want) in REPOS {
            let full = select(&listing(list), index, Variant::Full).unwrap();
            assert_eq!(full.files, names(want), "{name}, full precision");
            assert!(
                full.notes.iter().all(|n| !n.contains(": no ")),
                "{name}: {:?}",
                full.notes
            );
            let half = select(&listing(list), index, Variant::Fp16).unwrap();
            assert_eq!(half.files, fp16(want), "{name}, fp16");
        }
    }

    #[test]
    fn nothing_kiln_cannot_read_is_ever_selected() {
        for (name, list, index, _) in REPOS {
            for variant in [Variant::Full, Variant::Fp16] {
                for file in select(&listing(list), index, variant).unwrap().files {
                    for bad in [
                        ".bin", ".ckpt", ".onnx", ".msgpack", ".xml", ".yaml", "non_ema",
                    ] {
                        assert!(!file.contains(bad), "{name}: {file}");
                    }
                    for folder in ["safety_checker/", "feature_extractor/", "vae_"] {
                        assert!(!file.starts_with(folder), "{name}: {file}");
                    }
                    assert!(file.contains('/') || file == MODEL_INDEX, "{name}: {file}");
                }
            }
        }
    }

    #[test]
    fn skipped_components_are_noted() {
        let sel = select(&listing(SD15), SD15_INDEX, Variant::Full).unwrap();
        assert!(
            sel.notes.iter().any(|n| n.contains("safety_checker")),
            "{:?}",
            sel.notes
        );
        // [null, null] components are simply absent.
        let sel = select(&listing(SD21), SD21_INDEX, Variant::Full).unwrap();
        assert!(!sel.notes.iter().any(|n| n.contains("safety_checker")));
    }

    #[test]
    fn a_missing_variant_falls_back_with_a_note() {
        let list: Vec<String> = listing(SD15)
            .into_iter()
            .filter(|f| f != "vae/diffusion_pytorch_model.fp16.safetensors")
            .collect();
        let sel = select(&list, SD15_INDEX, Variant::Fp16).unwrap();
        assert!(
            sel.files
                .contains(&"vae/diffusion_pytorch_model.safetensors".to_string())
        );
        assert!(sel.notes.iter().any(|n| n.starts_with("vae: no ")));
        let list: Vec<String> = listing(SD15)
            .into_iter()
            .filter(|f| f != "unet/diffusion_pytorch_model.safetensors")
            .collect();
        let sel = select(&list, SD15_INDEX, Variant::Full).unwrap();
        assert!(
            sel.files
                .contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string())
        );
    }

    #[test]
    fn unusable_repos_are_refused_with_the_reason() {
        // Only .bin weights.
        let list: Vec<String> = listing(SD15)
            .into_iter()
            .filter(|f| !(f.starts_with("unet/") && f.ends_with(".safetensors")))
            .collect();
        let e = select(&list, SD15_INDEX, Variant::Full).unwrap_err();
        let SelectError::Component { component, message } = &e else {
            panic!("{e}");
        };
        assert_eq!(component, "unet");
        assert!(message.contains("diffusion_pytorch_model.bin"), "{e}");

        // Sharded weights.
        let mut list: Vec<String> = listing(SD15)
            .into_iter()
            .filter(|f| !(f.starts_with("unet/") && f.ends_with(".safetensors")))
            .collect();
        list.push("unet/diffusion_pytorch_model-00001-of-00002.safetensors".into());
        let e = select(&list, SD15_INDEX, Variant::Full).unwrap_err();
        assert!(e.to_string().contains("sharded"), "{e}");

        // No tokenizer files.
        let list: Vec<String> = listing(SD15)
            .into_iter()
            .filter(|f| !f.starts_with("tokenizer/"))
            .collect();
        let e = select(&list, SD15_INDEX, Variant::Full).unwrap_err();
        assert!(e.to_string().starts_with("component \"tokenizer\""), "{e}");

        // A single-file checkpoint repository.
        let list = listing("README.md v1-5-pruned-emaonly.safetensors");
        assert_eq!(
            select(&list, "{}", Variant::Full).unwrap_err(),
            SelectError::NoModelIndex
        );
        assert!(matches!(
            select(&listing(SD15), "[1, 2]", Variant::Full),
            Err(SelectError::ModelIndex(_))
        ));
    }

    #[test]
    fn tokenizer_json_is_preferred_when_present() {
        let mut list = listing(SD15);
        list.push("tokenizer/tokenizer.json".into());
        let sel = select(&list, SD15_INDEX, Variant::Full).unwrap();
        assert!(sel.files.contains(&"tokenizer/tokenizer.json".to_string()));
        assert!(!sel.files.contains(&"tokenizer/vocab.json".to_string()));
    }

    #[test]
    fn variant_names_parse() {
        assert_eq!(Variant::parse("fp16").unwrap(), Variant::Fp16);
        assert_eq!(Variant::parse("fp32").unwrap(), Variant::Full);
        assert!(Variant::parse("bf16").is_err());
    }
}
