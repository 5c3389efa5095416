//! `text_encoder*/config.json` (transformers' `CLIPTextConfig`) → [`ClipConfig`].

use std::path::Path;

use super::Keys;
use crate::clip::{Activation, ClipConfig};
use crate::error::PipelineError;

/// Reads a text encoder's `config.json`; `projected` for a `CLIPTextModelWithProjection`.
pub(crate) fn read_clip(path: &Path, projected: bool) -> Result<ClipConfig, PipelineError> {
    clip_config(&Keys::read(path)?, projected)
}

/// Maps a transformers CLIPTextConfig to kiln's, with transformers' defaults.
pub(super) fn clip_config(k: &Keys, projected: bool) -> Result<ClipConfig, PipelineError> {
    if let Some(model_type) = k.get::<String>("model_type")?
        && model_type != "clip_text_model"
    {
        return Err(k.error(format!(
            "model_type = {model_type:?}: expected a CLIP text model (clip_text_model)"
        )));
    }
    let hidden_act = match k.or("hidden_act", String::from("quick_gelu"))?.as_str() {
        "quick_gelu" => Activation::QuickGelu,
        "gelu" => Activation::Gelu,
        other => {
            return Err(k.error(format!(
                "hidden_act = {other:?}: expected quick_gelu (OpenAI CLIP) or gelu (OpenCLIP)"
            )));
        }
    };
    let layer_norm_eps: f64 = k.or("layer_norm_eps", 1e-5)?;
    if !(layer_norm_eps.is_finite() && layer_norm_eps > 0.0) {
        return Err(k.error(format!(
            "layer_norm_eps = {layer_norm_eps} must be positive"
        )));
    }
    let hidden_size: usize = k.or("hidden_size", 512)?;
    let heads: usize = k.or("num_attention_heads", 8)?;
    if heads == 0 || !hidden_size.is_multiple_of(heads) {
        return Err(k.error(format!(
            "hidden_size = {hidden_size} does not split into num_attention_heads = {heads}"
        )));
    }
    let max_position_embeddings: usize = k.or("max_position_embeddings", 77)?;
    if max_position_embeddings < 3 {
        return Err(k.error(format!(
            "max_position_embeddings = {max_position_embeddings} leaves no room for a prompt"
        )));
    }
    let num_hidden_layers: usize = k.or("num_hidden_layers", 12)?;
    if num_hidden_layers < 2 {
        return Err(k.error(format!(
            "num_hidden_layers = {num_hidden_layers}: SD text encoders have at least 2"
        )));
    }
    Ok(ClipConfig {
        vocab_size: k.or("vocab_size", 49408)?,
        hidden_size,
        intermediate_size: k.or("intermediate_size", 2048)?,
        num_hidden_layers,
        num_attention_heads: heads,
        max_position_embeddings,
        hidden_act,
        layer_norm_eps,
        projection_dim: if projected {
            Some(k.or("projection_dim", 512)?)
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(json: &str, projected: bool) -> Result<ClipConfig, String> {
        let keys =
            Keys::parse(Path::new("text_encoder/config.json"), json).map_err(|e| e.to_string())?;
        clip_config(&keys, projected).map_err(|e| e.to_string())
    }

    /// `text_encoder/config.json` of stable-diffusion-2-1 (OpenCLIP ViT-H/14, last layer dropped).
    const SD21_TEXT: &str = r#"{
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
        "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408
    }"#;

    #[test]
    fn sd21_text_encoder_is_gelu() -> Result<(), String> {
        let c = clip(SD21_TEXT, false)?;
        assert_eq!(c.hidden_act, Activation::Gelu);
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (1024, 23, 16)
        );
        assert_eq!(c.projection_dim, None);
        Ok(())
    }

    #[test]
    fn sdxl_second_encoder_has_a_projection() -> Result<(), String> {
        let bigg = SD21_TEXT
            .replace(r#""hidden_size": 1024"#, r#""hidden_size": 1280"#)
            .replace(r#""projection_dim": 512"#, r#""projection_dim": 1280"#);
        assert_eq!(clip(&bigg, true)?.projection_dim, Some(1280));
        Ok(())
    }

    #[test]
    fn defaults_eps_and_refusals() -> Result<(), String> {
        let c = clip("{}", false)?;
        assert_eq!(c.hidden_act, Activation::QuickGelu);
        assert_eq!((c.hidden_size, c.layer_norm_eps), (512, 1e-5));
        assert_eq!(
            clip(r#"{"layer_norm_eps": 1e-6}"#, false)?.layer_norm_eps,
            1e-6
        );
        assert!(
            clip(r#"{"hidden_act": "relu"}"#, false)
                .is_err_and(|e| e.contains("hidden_act") && e.contains("text_encoder/config.json"))
        );
        assert!(clip(r#"{"model_type": "t5"}"#, false).is_err_and(|e| e.contains("model_type")));
        Ok(())
    }
}
