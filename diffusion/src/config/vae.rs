//! `vae/config.json` (diffusers' `AutoencoderKL`) → candle's VAE config.
//!
//! candle's `AutoEncoderKL` is used as it is: it builds its ResNets and
//! attention with the configured group count and reads diffusers' tensor
//! names (new-style `to_q`/`to_out.0` when the checkpoint has them).

use std::path::Path;

use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde_json::{Value, json};

use super::Keys;
use crate::error::PipelineError;

/// A VAE ready to build.
#[derive(Clone, Debug)]
pub(crate) struct VaeSpec {
    /// Image channels in (encoder).
    pub(crate) in_channels: usize,
    /// Image channels out (decoder).
    pub(crate) out_channels: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding
    /// (0.18215 for SD 1.x/2.x, 0.13025 for SDXL).
    pub(crate) scaling_factor: f64,
    /// Image pixels per latent pixel along each side.
    pub(crate) downscale: usize,
    /// `force_upcast: true` in the config: the VAE overflows in f16 (SDXL's does), so
    /// an f16 pipeline keeps it in f32, as diffusers' SDXL pipelines upcast it.
    pub(crate) force_upcast: bool,
    /// candle's VAE config.
    pub(crate) config: AutoEncoderKLConfig,
}

/// Reads `vae/config.json`.
pub(crate) fn read_vae(path: &Path) -> Result<VaeSpec, PipelineError> {
    vae_spec(&Keys::read(path)?)
}

/// Maps a diffusers AutoencoderKL config to candle's, with diffusers' defaults.
pub(super) fn vae_spec(k: &Keys) -> Result<VaeSpec, PipelineError> {
    let channels: Vec<usize> = k.or("block_out_channels", vec![64])?;
    let n = channels.len();
    if n == 0 {
        return Err(k.error("block_out_channels is empty"));
    }
    for (key, expected) in [
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ] {
        if let Some(types) = k.get::<Vec<String>>(key)? {
            if types.len() != n {
                return Err(k.error(format!(
                    "{key} has {} entries but block_out_channels has {n}",
                    types.len()
                )));
            }
            if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| *t != expected) {
                return Err(k.error(format!("{key}[{i}] = {t:?}: expected {expected}")));
            }
        }
    }
    k.refuse_unless(
        "act_fn",
        &[json!("silu"), json!("swish")],
        "an activation other than SiLU",
    )?;
    k.refuse_unless(
        "shift_factor",
        &[json!(0), json!(0.0)],
        "a latent shift (SD3/Flux VAEs)",
    )?;
    let absent: &[Value] = &[];
    k.refuse_unless("latents_mean", absent, "per-channel latent statistics")?;
    k.refuse_unless("latents_std", absent, "per-channel latent statistics")?;
    k.refuse_unless(
        "mid_block_add_attention",
        &[json!(true)],
        "a mid block without attention",
    )?;
    let norm_num_groups: usize = k.or("norm_num_groups", 32)?;
    if let Some((i, c)) = channels
        .iter()
        .enumerate()
        .find(|(_, c)| norm_num_groups == 0 || !c.is_multiple_of(norm_num_groups))
    {
        return Err(k.error(format!(
            "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {norm_num_groups}"
        )));
    }
    let scaling_factor: f64 = k.or("scaling_factor", 0.18215)?;
    if !(scaling_factor.is_finite() && scaling_factor > 0.0) {
        return Err(k.error(format!(
            "scaling_factor = {scaling_factor} must be positive"
        )));
    }
    Ok(VaeSpec {
        in_channels: k.or("in_channels", 3)?,
        out_channels: k.or("out_channels", 3)?,
        scaling_factor,
        // Every block but the last halves the resolution.
        downscale: 1 << (n - 1),
        force_upcast: k.get::<bool>("force_upcast")?.unwrap_or(false),
        config: AutoEncoderKLConfig {
            block_out_channels: channels,
            layers_per_block: k.or("layers_per_block", 1)?,
            latent_channels: k.or("latent_channels", 4)?,
            norm_num_groups,
            use_quant_conv: k.or("use_quant_conv", true)?,
            use_post_quant_conv: k.or("use_post_quant_conv", true)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vae(json: &str) -> Result<VaeSpec, String> {
        let keys = Keys::parse(Path::new("vae/config.json"), json).map_err(|e| e.to_string())?;
        vae_spec(&keys).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_downscale() -> Result<(), String> {
        let spec = vae(
            r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512}"#,
        )?;
        assert_eq!(spec.downscale, 8);
        assert_eq!(spec.scaling_factor, 0.18215);
        assert_eq!(spec.config.latent_channels, 4);
        Ok(())
    }

    #[test]
    fn sdxl_vae_and_refusals() -> Result<(), String> {
        let sdxl = r#"{"block_out_channels": [128, 256, 512, 512], "force_upcast": true,
            "layers_per_block": 2, "scaling_factor": 0.13025, "shift_factor": null}"#;
        assert_eq!(vae(sdxl)?.scaling_factor, 0.13025);
        assert!(vae(sdxl)?.force_upcast);
        let playground = sdxl.replace(
            r#""force_upcast": true"#,
            r#""latents_mean": [0.1, 0.2, 0.3, 0.4]"#,
        );
        assert!(vae(&playground).is_err_and(|e| e.contains("latents_mean")));
        let flux = sdxl.replace(r#""shift_factor": null"#, r#""shift_factor": 0.1159"#);
        assert!(vae(&flux).is_err_and(|e| e.contains("shift_factor")));
        Ok(())
    }
}
