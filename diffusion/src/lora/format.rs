//! The key layouts of LoRA files: which module of which component a tensor belongs to.
//!
//! Two layouts are read:
//!
//! - **kohya / A1111** (sd-scripts, most files on Civitai):
//!   `lora_unet_<module>.{lora_down.weight, lora_up.weight, alpha}` and the same with
//!   `lora_te_` (the text encoder of SD 1.x / 2.x), or `lora_te1_` / `lora_te2_`
//!   (SDXL's two encoders). `<module>` is the module's path with every `.` written
//!   `_` (`down_blocks_0_attentions_0_proj_in`); it is found by writing each of the
//!   model's own module paths the same way, so any Linear or convolution of the model
//!   can be a target, including the ResNets' convolutions (LoCon). SDXL files from
//!   sd-scripts name UNet modules the original (SGM) way instead
//!   (`input_blocks_4_1_…`, `middle_block_…`, `output_blocks_…`); [`sgm_to_diffusers`]
//!   translates those as diffusers' converter does.
//! - **diffusers / PEFT** (`save_lora_weights`): `unet.<module>.lora_A.weight` /
//!   `.lora_B.weight` with `text_encoder.` and `text_encoder_2.` for the encoders,
//!   `<module>` the dotted path; the older diffusers names `.lora.down.weight` /
//!   `.lora.up.weight`, and an `.alpha` beside them, are read too.
//!
//! kiln's UNet and CLIP tensors carry diffusers' and transformers' names, so the
//! module paths of both layouts are kiln's own module paths.

use std::collections::{BTreeMap, HashMap};

use super::Component;

/// What one tensor of a LoRA file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// `lora_down` / `lora_A`: `[rank, in, (k, k)]`.
    Down,
    /// `lora_up` / `lora_B`: `[out, rank, (1, 1)]`.
    Up,
    /// `alpha`: a scalar; the deltas are scaled by `alpha / rank`.
    Alpha,
}

/// A tensor of a LoRA file placed in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Placed {
    /// The component it changes.
    pub(crate) component: Component,
    /// The module path in that component (`down_blocks.0.attentions.0.proj_in`).
    pub(crate) module: String,
    /// Down, up or alpha.
    pub(crate) part: Part,
}

/// The modules of one model component a LoRA may change: every weight with 2 or
/// 4 dimensions (Linear and convolution layers), by module path and by kohya name.
#[derive(Clone, Debug, Default)]
pub(crate) struct Modules {
    /// Module path → the shape of its `weight`.
    shapes: BTreeMap<String, Vec<usize>>,
    /// Module path with `.` written `_` → module path.
    kohya: HashMap<String, String>,
    /// ResNets per down block (`down_blocks.0.resnets.*`), for SGM names.
    layers_per_block: usize,
}

impl Modules {
    /// Returns the modules of a component from the names and shapes of its tensors.
    pub(crate) fn new(tensors: &BTreeMap<String, Vec<usize>>) -> Self {
        let mut out = Modules::default();
        for (name, shape) in tensors {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if let Some(rest) = module.strip_prefix("down_blocks.0.resnets.")
                && let Some(j) = rest.split('.').next().and_then(|j| j.parse::<usize>().ok())
            {
                out.layers_per_block = out.layers_per_block.max(j + 1);
            }
            if shape.len() == 2 || shape.len() == 4 {
                out.kohya
                    .insert(module.replace('.', "_"), module.to_string());
                out.shapes.insert(module.to_string(), shape.clone());
            }
        }
        out
    }

    /// Returns the shape of a module's weight.
    pub(crate) fn shape(&self, module: &str) -> Option<&[usize]> {
        self.shapes.get(module).map(Vec::as_slice)
    }

    /// Returns the module paths, sorted.
    pub(crate) fn paths(&self) -> impl Iterator<Item = (&String, &Vec<usize>)> {
        self.shapes.iter()
    }
}

/// kohya prefixes, the longer first (`lora_te1_` before `lora_te_`).
const KOHYA: [(&str, Component); 4] = [
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::Text(0)),
    ("lora_te2_", Component::Text(1)),
    ("lora_te_", Component::Text(0)),
];

/// diffusers prefixes, the longer first.
const DIFFUSERS: [(&str, Component); 3] = [
    ("text_encoder_2.", Component::Text(1)),
    ("text_encoder.", Component::Text(0)),
    ("unet.", Component::Unet),
];

/// kohya suffixes.
const KOHYA_PARTS: [(&str, Part); 3] = [
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// diffusers / PEFT suffixes.
const DIFFUSERS_PARTS: [(&str, Part); 5] = [
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

/// Splits `prefix{n}_{m}_{rest}` (or `prefix{n}_{m}` with `rest` empty) into numbers and rest.
fn block_numbers<'a>(name: &'a str, prefix: &str) -> Option<(usize, usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (n, rest) = rest.split_once('_')?;
    let (m, rest) = rest.split_once('_').unwrap_or((rest, ""));
    Some((n.parse().ok()?, m.parse().ok()?, rest))
}

/// Returns a ResNet's inner module name in diffusers' words (`in_layers_2` → `conv1`).
fn resnet_inner(rest: &str) -> String {
    for (sgm, diffusers) in [
        ("in_layers_2", "conv1"),
        ("out_layers_3", "conv2"),
        ("emb_layers_1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ] {
        if let Some(tail) = rest.strip_prefix(sgm) {
            return format!("{diffusers}{tail}");
        }
    }
    rest.to_string()
}

/// Translates a UNet module named the original (SGM / LDM) way, with `_` for `.`,
/// into its diffusers names (candidates, the likelier first), for a UNet with
/// `layers` ResNets per down block: `input_blocks_{n}_{m}` is down block
/// `(n - 1) / (layers + 1)`, ResNet (m = 0) or attention (m = 1) `(n - 1) % (layers + 1)`,
/// or its downsampler when that is `layers`; `middle_block_{0,1,2}` the mid block's
/// ResNet, attention, ResNet; `output_blocks_{n}_{m}` up block `n / (layers + 1)`,
/// ResNet (m = 0), attention or upsampler (m = 1), upsampler (m = 2).
pub(crate) fn sgm_to_diffusers(name: &str, layers: usize) -> Vec<String> {
    let per_level = layers + 1;
    let fixed = [
        ("input_blocks_0_0", "conv_in"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
        ("out_2", "conv_out"),
    ];
    if let Some((_, d)) = fixed.iter().find(|(sgm, _)| *sgm == name) {
        return vec![d.to_string()];
    }
    let join = |head: String, rest: &str| {
        if rest.is_empty() {
            head
        } else {
            format!("{head}_{rest}")
        }
    };
    if let Some((n, m, rest)) = block_numbers(name, "input_blocks_") {
        if n == 0 || layers == 0 {
            return Vec::new();
        }
        let (level, within) = ((n - 1) / per_level, (n - 1) % per_level);
        return match (within == layers, m) {
            (false, 0) => vec![join(
                format!("down_blocks_{level}_resnets_{within}"),
                &resnet_inner(rest),
            )],
            (false, 1) => vec![join(
                format!("down_blocks_{level}_attentions_{within}"),
                rest,
            )],
            (true, 0) => vec![join(
                format!("down_blocks_{level}_downsamplers_0"),
                &rest.replacen("op", "conv", 1),
            )],
            _ => Vec::new(),
        };
    }
    if let Some(rest) = name.strip_prefix("middle_block_") {
        let (m, rest) = rest.split_once('_').unwrap_or((rest, ""));
        return match m {
            "0" => vec![join("mid_block_resnets_0".into(), &resnet_inner(rest))],
            "1" => vec![join("mid_block_attentions_0".into(), rest)],
            "2" => vec![join("mid_block_resnets_1".into(), &resnet_inner(rest))],
            _ => Vec::new(),
        };
    }
    if let Some((n, m, rest)) = block_numbers(name, "output_blocks_") {
        let (level, j) = (n / per_level, n % per_level);
        return match m {
            0 => vec![join(
                format!("up_blocks_{level}_resnets_{j}"),
                &resnet_inner(rest),
            )],
            1 => vec![
                join(format!("up_blocks_{level}_attentions_{j}"), rest),
                join(format!("up_blocks_{level}_upsamplers_0"), rest),
            ],
            2 => vec![join(format!("up_blocks_{level}_upsamplers_0"), rest)],
            _ => Vec::new(),
        };
    }
    Vec::new()
}

/// Places one key of a LoRA file in the model whose components' modules are
/// `modules` (`Unet` first, then each text encoder); the error says why it does not fit.
pub(crate) fn place(key: &str, unet: &Modules, text: &[Modules]) -> Result<Placed, String> {
    let modules = |c: Component| match c {
        Component::Unet => Some(unet),
        Component::Text(i) => text.get(i),
    };
    for (prefix, component) in KOHYA {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let Some((name, part)) = KOHYA_PARTS
            .iter()
            .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|n| (n, *part)))
        else {
            return Err("is not a lora_down, lora_up or alpha tensor".into());
        };
        let Some(m) = modules(component) else {
            return Err(format!(
                "names {}, which this model does not have",
                component.name()
            ));
        };
        let sgm = match component {
            Component::Unet => sgm_to_diffusers(name, m.layers_per_block),
            Component::Text(_) => Vec::new(),
        };
        let found = std::iter::once(name.to_string())
            .chain(sgm)
            .find_map(|n| m.kohya.get(&n));
        return match found {
            Some(module) => Ok(Placed {
                component,
                module: module.clone(),
                part,
            }),
            None => Err(format!(
                "names no module of this model's {}",
                component.name()
            )),
        };
    }
    for (prefix, component) in DIFFUSERS {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let Some((module, part)) = DIFFUSERS_PARTS
            .iter()
            .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|n| (n, *part)))
        else {
            return Err("is not a lora_A, lora_B, lora.down, lora.up or alpha tensor".into());
        };
        let Some(m) = modules(component) else {
            return Err(format!(
                "names {}, which this model does not have",
                component.name()
            ));
        };
        return match m.shape(module) {
            Some(_) => Ok(Placed {
                component,
                module: module.to_string(),
                part,
            }),
            None => Err(format!(
                "names no module of this model's {}",
                component.name()
            )),
        };
    }
    Err("is in neither the kohya (lora_unet_, lora_te_) nor the diffusers (unet., text_encoder.) layout".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgm_names_translate_as_diffusers_converts_sdxl() {
        // SDXL: two ResNets per down block.
        let cases = [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_5_0_in_layers_2",
                "down_blocks_1_resnets_1_conv1",
            ),
            (
                "input_blocks_7_0_skip_connection",
                "down_blocks_2_resnets_0_conv_shortcut",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            (
                "output_blocks_2_0_out_layers_3",
                "up_blocks_0_resnets_2_conv2",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
                "up_blocks_1_attentions_2_transformer_blocks_1_attn2_to_out_0",
            ),
            ("time_embed_0", "time_embedding_linear_1"),
        ];
        for (sgm, diffusers) in cases {
            let got = sgm_to_diffusers(sgm, 2);
            assert_eq!(got.first().map(String::as_str), Some(diffusers), "{sgm}");
        }
        // A level without attention: the upsampler follows its ResNets at m = 1.
        assert!(
            sgm_to_diffusers("output_blocks_8_1_conv", 2)
                .contains(&"up_blocks_2_upsamplers_0_conv".to_string())
        );
        assert!(sgm_to_diffusers("down_blocks_0_resnets_0_conv1", 2).is_empty());
        // Found through the model's modules.
        let unet = modules(&[
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                &[8, 8],
            ),
            ("down_blocks.0.resnets.1.conv1.weight", &[8, 8, 3, 3]),
        ]);
        assert_eq!(unet.layers_per_block, 2);
        let placed = super::place(
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            &unet,
            &[],
        );
        assert_eq!(
            placed.map(|p| p.module),
            Ok("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q".to_string())
        );
    }

    fn modules(names: &[(&str, &[usize])]) -> Modules {
        Modules::new(
            &names
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_vec()))
                .collect(),
        )
    }

    #[test]
    fn both_layouts_place_their_keys_in_kiln_modules() {
        let unet = modules(&[
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
                &[8, 8],
            ),
            ("down_blocks.0.resnets.0.conv1.weight", &[8, 8, 3, 3]),
            ("down_blocks.0.resnets.0.norm1.weight", &[8]),
        ]);
        let text = [
            modules(&[(
                "text_model.encoder.layers.0.self_attn.q_proj.weight",
                &[4, 4],
            )]),
            modules(&[("text_model.encoder.layers.0.mlp.fc1.weight", &[8, 4])]),
        ];
        let place = |k: &str| place(k, &unet, &text);
        let to_out = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
        assert_eq!(
            place(
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight"
            ),
            Ok(Placed {
                component: Component::Unet,
                module: to_out.into(),
                part: Part::Up
            })
        );
        assert_eq!(
            place(&format!("unet.{to_out}.lora_A.weight")),
            Ok(Placed {
                component: Component::Unet,
                module: to_out.into(),
                part: Part::Down
            })
        );
        assert_eq!(
            place("lora_unet_down_blocks_0_resnets_0_conv1.alpha").map(|p| p.part),
            Ok(Part::Alpha)
        );
        assert_eq!(
            place("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight")
                .map(|p| p.component),
            Ok(Component::Text(1))
        );
        assert_eq!(
            place("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight")
                .map(|p| p.component),
            Ok(Component::Text(0))
        );
        assert_eq!(
            place("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight")
                .map(|p| p.component),
            Ok(Component::Text(1))
        );
        // Norms are not targets; unknown modules, parts and layouts are refused.
        assert!(place("lora_unet_down_blocks_0_resnets_0_norm1.lora_up.weight").is_err());
        assert!(place("lora_unet_up_blocks_9_resnets_0_conv1.lora_up.weight").is_err());
        assert!(place("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a").is_err());
        assert!(place("model.diffusion_model.x.weight").is_err());
        let one_encoder = super::place(
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha",
            &unet,
            &text[..1],
        );
        assert!(one_encoder.unwrap_err().contains("text_encoder_2"));
    }
}
