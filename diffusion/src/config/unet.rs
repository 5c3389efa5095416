//! `unet/config.json` (diffusers' `UNet2DConditionModel`) → [`UnetConfig`].
//!
//! Head counts: diffusers' `attention_head_dim` is, for every SD 1.x, 2.x and
//! SDXL config, the number of attention heads, not their width: a historical
//! misnomer diffusers keeps for compatibility (`num_attention_heads =
//! num_attention_heads or attention_head_dim` in `unet_2d_condition.py`, and
//! its constructor refuses `num_attention_heads` itself). SD 2.1's
//! `[5, 10, 20, 20]` over `[320, 640, 1280, 1280]` channels is therefore
//! heads of width 64, as in the original OpenCLIP-conditioned model, and
//! candle's own SD 2.1 and SDXL presets pass the same numbers as head counts.
//! The mid block uses the last level's head count and transformer depth.

use std::path::Path;

use serde_json::{Value, json};

use super::Keys;
use crate::error::PipelineError;
use crate::unet::{CrossAttention, TextTime, UnetBlock, UnetConfig};

/// Reads `unet/config.json`.
pub(crate) fn read_unet(path: &Path) -> Result<UnetConfig, PipelineError> {
    unet_config(&Keys::read(path)?)
}

/// Refuses the keys of `UNet2DConditionModel` that change the computation in ways kiln does not run.
fn refuse_unsupported(k: &Keys) -> Result<(), PipelineError> {
    let absent: &[Value] = &[];
    for (key, what) in [
        ("class_embed_type", "a class embedding"),
        ("num_class_embeds", "a class embedding"),
        (
            "time_cond_proj_dim",
            "a guidance-scale embedding (LCM-distilled UNets)",
        ),
        ("encoder_hid_dim", "an encoder projection"),
        ("encoder_hid_dim_type", "an encoder projection"),
        ("time_embedding_dim", "a custom time-embedding width"),
        ("time_embedding_act_fn", "a time-embedding activation"),
        ("timestep_post_act", "a time-embedding activation"),
        ("cross_attention_norm", "a cross-attention norm"),
        (
            "reverse_transformer_layers_per_block",
            "asymmetric transformer depths",
        ),
        (
            "num_attention_heads",
            "num_attention_heads (diffusers refuses it too; head counts go in attention_head_dim)",
        ),
    ] {
        k.refuse_unless(key, absent, what)?;
    }
    let (no, one) = (json!(false), [json!(1), json!(1.0)]);
    for (key, neutral, what) in [
        (
            "dual_cross_attention",
            &[no.clone()][..],
            "dual cross-attention",
        ),
        (
            "mid_block_only_cross_attention",
            &[no.clone()][..],
            "cross-attention only",
        ),
        (
            "class_embeddings_concat",
            &[no.clone()][..],
            "a class embedding",
        ),
        (
            "resnet_skip_time_act",
            &[no.clone()][..],
            "a skipped time activation",
        ),
        ("resnet_out_scale_factor", &one[..], "a ResNet output scale"),
        (
            "act_fn",
            &[json!("silu"), json!("swish")][..],
            "an activation other than SiLU",
        ),
        (
            "resnet_time_scale_shift",
            &[json!("default")][..],
            "scale-shift time conditioning",
        ),
        (
            "time_embedding_type",
            &[json!("positional")][..],
            "a non-positional time embedding",
        ),
        (
            "attention_type",
            &[json!("default")][..],
            "gated or other attention",
        ),
        (
            "conv_in_kernel",
            &[json!(3)][..],
            "a conv_in kernel other than 3",
        ),
        (
            "conv_out_kernel",
            &[json!(3)][..],
            "a conv_out kernel other than 3",
        ),
        (
            "addition_embed_type",
            &[json!("text_time")][..],
            "added conditioning other than SDXL's \"text_time\"",
        ),
    ] {
        k.refuse_unless(key, neutral, what)?;
    }
    match k.raw("only_cross_attention") {
        None | Some(Value::Null | Value::Bool(false)) => {}
        Some(Value::Array(flags)) if flags.iter().all(|f| *f == no) => {}
        Some(v) => {
            return Err(k.error(format!(
                "only_cross_attention = {v}: cross-attention-only blocks are not supported"
            )));
        }
    }
    // Absent means diffusers' default; an explicit null means no mid block at all.
    match k.raw("mid_block_type") {
        None => {}
        Some(Value::String(s)) if s == "UNetMidBlock2DCrossAttn" => {}
        Some(v) => {
            return Err(k.error(format!(
                "mid_block_type = {v}: kiln runs UNetMidBlock2DCrossAttn only"
            )));
        }
    }
    Ok(())
}

/// Maps a diffusers UNet config to kiln's, with diffusers' defaults for missing keys.
pub(crate) fn unet_config(k: &Keys) -> Result<UnetConfig, PipelineError> {
    refuse_unsupported(k)?;
    let channels: Vec<usize> = k.or("block_out_channels", vec![320, 640, 1280, 1280])?;
    let n = channels.len();
    if n == 0 {
        return Err(k.error("block_out_channels is empty"));
    }
    let down_types: Vec<String> = k.or(
        "down_block_types",
        ["CrossAttnDownBlock2D"; 3]
            .into_iter()
            .chain(["DownBlock2D"])
            .map(String::from)
            .collect(),
    )?;
    let up_types: Vec<String> = k.or(
        "up_block_types",
        ["UpBlock2D"]
            .into_iter()
            .chain(["CrossAttnUpBlock2D"; 3])
            .map(String::from)
            .collect(),
    )?;
    if down_types.len() != n || up_types.len() != n {
        return Err(k.error(format!(
            "block_out_channels has {n} entries but down_block_types has {} and up_block_types {}",
            down_types.len(),
            up_types.len()
        )));
    }
    let heads = k.per_block("attention_head_dim", n, 8)?;
    let depths = k.per_block("transformer_layers_per_block", n, 1)?;
    let layers_per_block = uniform(
        k,
        "layers_per_block",
        &k.per_block("layers_per_block", n, 2)?,
    )?;
    let cross_attention_dim = uniform(
        k,
        "cross_attention_dim",
        &k.per_block("cross_attention_dim", n, 1280)?,
    )?;
    let norm_num_groups: usize = k.or("norm_num_groups", 32)?;
    if layers_per_block == 0 {
        return Err(k.error("layers_per_block must be positive"));
    }

    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let cross = match down_types[i].as_str() {
            "CrossAttnDownBlock2D" => true,
            "DownBlock2D" => false,
            other => {
                return Err(k.error(format!(
                    "down_block_types[{i}] = {other:?}: expected CrossAttnDownBlock2D or DownBlock2D"
                )));
            }
        };
        // Up block j mirrors down block n - 1 - j.
        let up_index = n - 1 - i;
        let expected_up = if cross {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        };
        if up_types[up_index] != expected_up {
            return Err(k.error(format!(
                "up_block_types[{up_index}] = {:?}: expected {expected_up} to mirror down_block_types[{i}]",
                up_types[up_index]
            )));
        }
        let (c, h) = (channels[i], heads[i]);
        if c == 0 || norm_num_groups == 0 || !c.is_multiple_of(norm_num_groups) {
            return Err(k.error(format!(
                "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {norm_num_groups}"
            )));
        }
        // The mid block uses the last level's heads even when that level has no attention.
        if (cross || i == n - 1) && (h == 0 || !c.is_multiple_of(h)) {
            return Err(k.error(format!(
                "block_out_channels[{i}] = {c} does not split into attention_head_dim[{i}] = {h} heads"
            )));
        }
        if (cross || i == n - 1) && depths[i] == 0 {
            return Err(k.error(format!(
                "transformer_layers_per_block[{i}] = 0: an attention needs a layer"
            )));
        }
        blocks.push(UnetBlock {
            channels: c,
            attention: cross.then_some(CrossAttention {
                heads: h,
                layers: depths[i],
            }),
        });
    }

    let text_time = match k.get::<String>("addition_embed_type")?.as_deref() {
        Some("text_time") => {
            let time_embed_dim = k.get::<usize>("addition_time_embed_dim")?.ok_or_else(|| {
                k.error("addition_embed_type = \"text_time\" needs addition_time_embed_dim")
            })?;
            let input_dim = k
                .get::<usize>("projection_class_embeddings_input_dim")?
                .ok_or_else(|| {
                    k.error(
                        "addition_embed_type = \"text_time\" needs projection_class_embeddings_input_dim",
                    )
                })?;
            Some(TextTime {
                time_embed_dim,
                input_dim,
            })
        }
        _ => None,
    };

    Ok(UnetConfig {
        in_channels: k.or("in_channels", 4)?,
        out_channels: k.or("out_channels", 4)?,
        mid_attention: CrossAttention {
            heads: heads[n - 1],
            layers: depths[n - 1],
        },
        blocks,
        layers_per_block,
        cross_attention_dim,
        use_linear_projection: k.or("use_linear_projection", false)?,
        norm_num_groups,
        norm_eps: k.or("norm_eps", 1e-5)?,
        flip_sin_to_cos: k.or("flip_sin_to_cos", true)?,
        freq_shift: k.or("freq_shift", 0.0)?,
        downsample_padding: k.or("downsample_padding", 1)?,
        mid_block_scale_factor: k.or("mid_block_scale_factor", 1.0)?,
        center_input_sample: k.or("center_input_sample", false)?,
        text_time,
    })
}

/// Returns the one value of a per-block list that kiln needs to be the same for every block.
fn uniform(k: &Keys, key: &str, values: &[usize]) -> Result<usize, PipelineError> {
    match values.split_first() {
        Some((first, rest)) if rest.iter().all(|v| v == first) => Ok(*first),
        _ => Err(k.error(format!(
            "{key} = {values:?}: kiln needs one value for every block"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(json: &str) -> Result<UnetConfig, String> {
        let keys = Keys::parse(Path::new("unet/config.json"), json).map_err(|e| e.to_string())?;
        unet_config(&keys).map_err(|e| e.to_string())
    }

    fn blocks(c: &UnetConfig) -> Vec<(usize, Option<(usize, usize)>)> {
        c.blocks
            .iter()
            .map(|b| (b.channels, b.attention.map(|a| (a.heads, a.layers))))
            .collect()
    }

    /// The UNet config of stable-diffusion-v1-5, as diffusers ships it.
    const SD15_UNET: &str = r#"{
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
        "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;

    /// The UNet config of stable-diffusion-2-1 (768 px, v-prediction).
    const SD21_UNET: &str = r#"{
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
        "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0,
        "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
        "sample_size": 96,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": true, "use_linear_projection": true
    }"#;

    /// The UNet config of stable-diffusion-xl-base-1.0.
    const SDXL_UNET: &str = r#"{
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": false,
        "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
        "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
        "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_only_cross_attention": null, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
        "num_attention_heads": null, "num_class_embeds": null, "only_cross_attention": false,
        "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": null,
        "time_embedding_act_fn": null, "time_embedding_dim": null,
        "time_embedding_type": "positional", "timestep_post_act": null,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": null, "use_linear_projection": true
    }"#;

    #[test]
    fn sd15_unet() -> Result<(), String> {
        let c = unet(SD15_UNET)?;
        assert_eq!(
            blocks(&c),
            [
                (320, Some((8, 1))),
                (640, Some((8, 1))),
                (1280, Some((8, 1))),
                (1280, None)
            ]
        );
        assert_eq!(
            c.mid_attention,
            CrossAttention {
                heads: 8,
                layers: 1
            }
        );
        assert_eq!(
            (c.cross_attention_dim, c.layers_per_block, c.norm_num_groups),
            (768, 2, 32)
        );
        assert!(c.flip_sin_to_cos && !c.use_linear_projection && c.text_time.is_none());
        Ok(())
    }

    /// candle's `StableDiffusionConfig::v2_1` preset: `bc(320, Some(1), 5)`, `bc(640, Some(1), 10)`,
    /// `bc(1280, Some(1), 20)`, `bc(1280, None, 20)`, where the last number is the head count
    /// (`attn_num_head_channels`, split as `channels / n_heads`): heads of width 64.
    #[test]
    fn sd21_heads_are_counts_of_width_64() -> Result<(), String> {
        let c = unet(SD21_UNET)?;
        assert_eq!(
            blocks(&c),
            [
                (320, Some((5, 1))),
                (640, Some((10, 1))),
                (1280, Some((20, 1))),
                (1280, None)
            ]
        );
        for b in &c.blocks {
            if let Some(a) = b.attention {
                assert_eq!(b.channels / a.heads, 64);
            }
        }
        assert_eq!(
            c.mid_attention,
            CrossAttention {
                heads: 20,
                layers: 1
            }
        );
        assert!(c.use_linear_projection);
        assert_eq!(c.cross_attention_dim, 1024);
        Ok(())
    }

    /// candle's SDXL preset: `bc(320, None, 5)`, `bc(640, Some(2), 10)`, `bc(1280, Some(10), 20)`;
    /// the mid block takes the last level's 20 heads and 10 layers, as diffusers does.
    #[test]
    fn sdxl_depths_and_added_conditioning() -> Result<(), String> {
        let c = unet(SDXL_UNET)?;
        assert_eq!(
            blocks(&c),
            [(320, None), (640, Some((10, 2))), (1280, Some((20, 10)))]
        );
        assert_eq!(
            c.mid_attention,
            CrossAttention {
                heads: 20,
                layers: 10
            }
        );
        assert_eq!(
            c.text_time,
            Some(TextTime {
                time_embed_dim: 256,
                input_dim: 2816
            })
        );
        // 2816 = 1280 (pooled text) + 6 time ids × 256.
        assert_eq!(1280 + super::super::SDXL_TIME_IDS * 256, 2816);
        Ok(())
    }

    #[test]
    fn inpainting_unet_reads_nine_channels() -> Result<(), String> {
        let c = unet(&SD15_UNET.replace(r#""in_channels": 4"#, r#""in_channels": 9"#))?;
        assert_eq!((c.in_channels, c.out_channels), (9, 4));
        Ok(())
    }

    #[test]
    fn refuses_what_kiln_cannot_run_naming_the_key() {
        let cases = [
            (
                SD15_UNET.replace(r#""act_fn""#, r#""num_attention_heads": 4, "act_fn""#),
                "num_attention_heads",
            ),
            (
                SD15_UNET.replace(r#""act_fn""#, r#""addition_embed_type": "text", "act_fn""#),
                "addition_embed_type",
            ),
            (
                SD15_UNET.replace(r#""act_fn""#, r#""time_cond_proj_dim": 256, "act_fn""#),
                "time_cond_proj_dim",
            ),
            (
                SD15_UNET.replace(r#""act_fn""#, r#""mid_block_type": null, "act_fn""#),
                "mid_block_type",
            ),
            (
                SD15_UNET.replace(r#""act_fn""#, r#""class_embed_type": "timestep", "act_fn""#),
                "class_embed_type",
            ),
            (
                SD15_UNET.replace(
                    r#"["UpBlock2D", "CrossAttnUpBlock2D""#,
                    r#"["CrossAttnUpBlock2D", "UpBlock2D""#,
                ),
                "up_block_types[1]",
            ),
            (
                SD15_UNET.replace(r#""norm_num_groups": 32"#, r#""norm_num_groups": 7"#),
                "norm_num_groups",
            ),
            (
                SD15_UNET.replace(
                    r#""layers_per_block": 2"#,
                    r#""layers_per_block": [2, 2, 1, 2]"#,
                ),
                "layers_per_block",
            ),
            (
                SDXL_UNET.replace(r#""addition_time_embed_dim": 256,"#, ""),
                "addition_time_embed_dim",
            ),
            (
                SD21_UNET.replace("[5, 10, 20, 20]", "[5, 10, 20]"),
                "attention_head_dim has 3 entries",
            ),
        ];
        for (json, key) in cases {
            let result = unet(&json);
            assert!(
                result
                    .as_ref()
                    .is_err_and(|e| e.contains(key) && e.starts_with("unet/config.json: ")),
                "{key}: {result:?}"
            );
        }
    }
}
