//! Single-file ControlNets in the original (ControlNet / LDM) layout, such as
//! `control_v11p_sd15_openpose.safetensors`: tensor names mapped to diffusers'.
//!
//! The mapping is one table of name prefixes ([`prefixes`]), read in either
//! direction: loading maps a file's names to diffusers' ([`to_diffusers`]),
//! the tiny-model writer maps diffusers' names to the original ones
//! ([`to_original`]). It follows diffusers' `convert_ldm_unet_checkpoint` with
//! `controlnet=True`: `input_blocks` become the down blocks (resnet `.0`,
//! attention `.1`, downsampler `.0.op`), `middle_block` the mid block,
//! `input_hint_block` the control-image encoder, `zero_convs` and
//! `middle_block_out` the zero convolutions, `time_embed` and `label_emb` the
//! time and SDXL added embeddings; inside a ResNet `in_layers.0/2`,
//! `emb_layers.1`, `out_layers.0/3` and `skip_connection` become `norm1`,
//! `conv1`, `time_emb_proj`, `norm2`, `conv2` and `conv_shortcut`. Attention
//! blocks keep their inner names. A `control_model.` prefix (as A1111 saves
//! them) is accepted and dropped.

use crate::unet::UnetConfig;

/// The prefix some single-file ControlNets put before every tensor name.
pub(crate) const MODEL_PREFIX: &str = "control_model.";

/// Inner renames of a ResNet block: (original, diffusers).
const RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

/// One prefix pair of the mapping: (original, diffusers, whether it is a ResNet).
type Prefix = (String, String, bool);

/// The prefix pairs of a ControlNet over `unet` with `hint_convs` convolutions in
/// its control-image encoder between `conv_in` and `conv_out`.
fn prefixes(unet: &UnetConfig, hint_convs: usize) -> Vec<Prefix> {
    let mut out: Vec<Prefix> = Vec::new();
    let mut add = |a: String, b: &str, resnet: bool| out.push((a, b.to_string(), resnet));
    add("time_embed.0.".into(), "time_embedding.linear_1.", false);
    add("time_embed.2.".into(), "time_embedding.linear_2.", false);
    add("label_emb.0.0.".into(), "add_embedding.linear_1.", false);
    add("label_emb.0.2.".into(), "add_embedding.linear_2.", false);
    add("input_blocks.0.0.".into(), "conv_in.", false);
    add(
        "input_hint_block.0.".into(),
        "controlnet_cond_embedding.conv_in.",
        false,
    );
    for b in 0..hint_convs {
        let to = format!("controlnet_cond_embedding.blocks.{b}.");
        add(format!("input_hint_block.{}.", 2 * (b + 1)), &to, false);
    }
    add(
        format!("input_hint_block.{}.", 2 * (hint_convs + 1)),
        "controlnet_cond_embedding.conv_out.",
        false,
    );
    let layers = unet.layers_per_block;
    let levels = unet.blocks.len();
    let mut zero = 0;
    add("zero_convs.0.0.".into(), "controlnet_down_blocks.0.", false);
    for level in 0..levels {
        for j in 0..layers {
            let n = 1 + level * (layers + 1) + j;
            add(
                format!("input_blocks.{n}.0."),
                &format!("down_blocks.{level}.resnets.{j}."),
                true,
            );
            add(
                format!("input_blocks.{n}.1."),
                &format!("down_blocks.{level}.attentions.{j}."),
                false,
            );
            zero += 1;
            add(
                format!("zero_convs.{n}.0."),
                &format!("controlnet_down_blocks.{zero}."),
                false,
            );
        }
        if level + 1 < levels {
            let n = 1 + level * (layers + 1) + layers;
            add(
                format!("input_blocks.{n}.0.op."),
                &format!("down_blocks.{level}.downsamplers.0.conv."),
                false,
            );
            zero += 1;
            add(
                format!("zero_convs.{n}.0."),
                &format!("controlnet_down_blocks.{zero}."),
                false,
            );
        }
    }
    add("middle_block.0.".into(), "mid_block.resnets.0.", true);
    add("middle_block.1.".into(), "mid_block.attentions.0.", false);
    add("middle_block.2.".into(), "mid_block.resnets.1.", true);
    add("middle_block_out.0.".into(), "controlnet_mid_block.", false);
    out
}

/// Maps `name` through the first pair whose `from` side is a prefix of it.
fn map(name: &str, pairs: &[Prefix], original_to_diffusers: bool) -> Option<String> {
    pairs.iter().find_map(|(orig, diff, resnet)| {
        let (from, to) = if original_to_diffusers {
            (orig, diff)
        } else {
            (diff, orig)
        };
        let rest = name.strip_prefix(from.as_str())?;
        let rest = if *resnet {
            RESNET
                .iter()
                .find_map(|(o, d)| {
                    let (f, t) = if original_to_diffusers {
                        (o, d)
                    } else {
                        (d, o)
                    };
                    rest.strip_prefix(f).map(|r| format!("{t}{r}"))
                })
                .unwrap_or_else(|| rest.to_string())
        } else {
            rest.to_string()
        };
        Some(format!("{to}{rest}"))
    })
}

/// Maps an original-layout tensor name (with or without `control_model.`) to
/// diffusers'; `None` for a name outside the mapping.
pub(crate) fn to_diffusers(name: &str, unet: &UnetConfig, hint_convs: usize) -> Option<String> {
    let name = name.strip_prefix(MODEL_PREFIX).unwrap_or(name);
    map(name, &prefixes(unet, hint_convs), true)
}

/// Maps a diffusers tensor name to the original layout, with `control_model.`.
pub(crate) fn to_original(name: &str, unet: &UnetConfig, hint_convs: usize) -> Option<String> {
    map(name, &prefixes(unet, hint_convs), false).map(|n| format!("{MODEL_PREFIX}{n}"))
}

/// Returns the number of `input_hint_block` convolutions between its first and its
/// last (the `blocks` of diffusers' control-image encoder) from a file's tensor names.
pub(crate) fn hint_convs<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    let last = names
        .filter_map(|n| {
            let n = n.strip_prefix(MODEL_PREFIX).unwrap_or(n);
            n.strip_prefix("input_hint_block.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    (last / 2).saturating_sub(1)
}
