//! What a recipe adds to its base model, as A1111 names it: LoRAs, textual-inversion
//! embeddings, ControlNets and the hires fix; and the `<lora:NAME:WEIGHT>` prompt tags.
//!
//! A recipe carries these in [`Extras`], flattened into the recipe's JSON with every
//! field left out when empty, so the hash of a recipe without extras is the hash it had
//! before extras existed. Names are resolved to content hashes at admission (the
//! coordinator knows what the workers announced), so the hashes are part of the recipe
//! hash and of the PNG `parameters`.

use serde::{Deserialize, Serialize};

use crate::error::{FieldError, quote};

/// LoRAs, embeddings, ControlNets and hires fix of one recipe.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Extras {
    /// LoRAs applied to the UNet and the text encoders, in the order named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
    /// Textual-inversion embeddings the prompts use (words equal to an embedding's name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<EmbeddingRef>,
    /// ControlNets whose residuals are added to the UNet's, each with its control image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controlnets: Vec<ControlNetRef>,
    /// Render at the recipe size, upscale, then an img2img pass at the new size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<Hires>,
}

impl Extras {
    /// Returns true when the recipe adds nothing to its base model.
    pub fn is_empty(&self) -> bool {
        self.loras.is_empty()
            && self.embeddings.is_empty()
            && self.controlnets.is_empty()
            && self.hires.is_none()
    }
}

/// One LoRA of a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    /// The LoRA's name: its file stem on the workers.
    pub name: String,
    /// Content hash (sha256 hex of the file); empty until admission resolves it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// Multiplier of the UNet's deltas.
    pub unet_weight: f64,
    /// Multiplier of the text encoders' deltas.
    pub te_weight: f64,
}

/// One textual-inversion embedding a recipe's prompts use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingRef {
    /// The embedding's name: its file stem, the word that stands for it in a prompt.
    pub name: String,
    /// Content hash (sha256 hex of the file); empty until admission resolves it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

/// One ControlNet of a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlNetRef {
    /// The ControlNet's name, as the workers announce it (`--controlnet NAME=PATH`).
    pub model: String,
    /// Content hash of the ControlNet; empty until admission resolves it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// sha256 (hex) of the control image among the job's blobs.
    pub image: String,
    /// Multiplier of its residuals.
    pub scale: f64,
    /// Fraction of the steps where it starts to apply.
    pub start: f64,
    /// Fraction of the steps where it stops applying.
    pub end: f64,
    /// How the control image is fitted to the render size.
    pub resize: ResizeMode,
    /// A preprocessor run on the control image before use; none: it is a ready map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocessor>,
}

/// A1111's resize modes for control images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Scale to cover the render size, then crop the overflow ("Crop and Resize").
    Crop,
    /// Scale to fit inside, then pad ("Resize and Fill").
    Fill,
    /// Scale each side independently ("Just Resize").
    Stretch,
}

impl ResizeMode {
    /// Every mode, in the order error messages list them.
    pub const ALL: &'static [ResizeMode] =
        &[ResizeMode::Crop, ResizeMode::Fill, ResizeMode::Stretch];

    /// The batch-file name.
    pub fn name(self) -> &'static str {
        match self {
            ResizeMode::Crop => "crop",
            ResizeMode::Fill => "fill",
            ResizeMode::Stretch => "stretch",
        }
    }

    /// Parses a batch-file name; the error names `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        parse_name(field, value, Self::ALL, Self::name, "resize mode")
    }
}

/// Preprocessors that need no model weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocessor {
    /// Canny edges (thresholds 100 / 200).
    Canny,
    /// Threshold and invert of a sketch.
    Scribble,
    /// Thin dark lines of a drawing, as white on black.
    Lineart,
}

impl Preprocessor {
    /// Every preprocessor.
    pub const ALL: &'static [Preprocessor] = &[
        Preprocessor::Canny,
        Preprocessor::Scribble,
        Preprocessor::Lineart,
    ];

    /// The batch-file and CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Preprocessor::Canny => "canny",
            Preprocessor::Scribble => "scribble",
            Preprocessor::Lineart => "lineart",
        }
    }

    /// Parses a batch-file name; the error names `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        parse_name(field, value, Self::ALL, Self::name, "preprocessor")
    }
}

/// The hires fix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hires {
    /// Factor of both sides.
    pub scale: f64,
    /// Denoising steps of the second pass.
    pub steps: u32,
    /// img2img strength of the second pass.
    pub denoise: f64,
    /// How the first pass is upscaled.
    pub upscaler: Upscaler,
}

impl Hires {
    /// The size of the second pass and of the output image: each side times `scale`,
    /// rounded down to a multiple of 8 (A1111 takes `int(side * scale)` and the
    /// latents are an eighth of it).
    pub fn target_size(&self, width: u32, height: u32) -> (u32, u32) {
        let side = |s: u32| (((f64::from(s) * self.scale) as u32) / 8) * 8;
        (side(width), side(height))
    }
}

/// How the hires fix upscales the first pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Upscaler {
    /// The latents, bilinearly ("Latent" in A1111).
    Latent,
    /// The decoded image, with a Lanczos filter.
    Lanczos,
}

impl Upscaler {
    /// Every upscaler.
    pub const ALL: &'static [Upscaler] = &[Upscaler::Latent, Upscaler::Lanczos];

    /// The batch-file name.
    pub fn name(self) -> &'static str {
        match self {
            Upscaler::Latent => "latent",
            Upscaler::Lanczos => "lanczos",
        }
    }

    /// The name A1111 writes in `parameters` (`Hires upscaler: Latent`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Upscaler::Latent => "Latent",
            Upscaler::Lanczos => "Lanczos",
        }
    }

    /// Parses a batch-file name; the error names `field`.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        parse_name(field, value, Self::ALL, Self::name, "upscaler")
    }
}

fn parse_name<T: Copy>(
    field: &str,
    value: &str,
    all: &[T],
    name: fn(T) -> &'static str,
    what: &str,
) -> Result<T, FieldError> {
    all.iter()
        .copied()
        .find(|&v| name(v) == value)
        .ok_or_else(|| {
            let known: Vec<_> = all.iter().map(|&v| name(v)).collect();
            FieldError::new(
                field,
                format!(
                    "unknown {what} {}; expected one of {}",
                    quote(value),
                    known.join(", ")
                ),
            )
        })
}

/// An A1111 extra-network tag in a prompt: `<KIND:NAME:ARG...>`, such as
/// `<lora:mira-v3:0.8>` or `<lora:mira-v3:0.8:0.5>` (UNet weight, text-encoder weight).
#[derive(Clone, Debug, PartialEq)]
pub struct Tag {
    /// `lora`, `hypernet`, ...
    pub kind: String,
    /// The network's name.
    pub name: String,
    /// The arguments after the name, as written.
    pub args: Vec<String>,
}

/// Finds the extra-network tags of a prompt: `<` then a kind of ASCII letters, digits
/// and `_`, `:`, then anything but `>` up to `>`, as A1111's `re_extra_net`.
pub fn tags(prompt: &str) -> Vec<Tag> {
    spans(prompt)
        .into_iter()
        .map(|(start, end)| {
            let inner = &prompt[start + 1..end - 1];
            let mut parts = inner.split(':');
            let kind = parts.next().unwrap_or_default().to_string();
            let name = parts.next().unwrap_or_default().to_string();
            Tag {
                kind,
                name,
                args: parts.map(str::to_string).collect(),
            }
        })
        .collect()
}

/// Returns the prompt with its extra-network tags removed: what the text encoder reads.
pub fn strip(prompt: &str) -> String {
    let mut out = String::with_capacity(prompt.len());
    let mut at = 0;
    for (start, end) in spans(prompt) {
        out.push_str(&prompt[at..start]);
        at = end;
    }
    out.push_str(&prompt[at..]);
    out
}

/// Byte ranges of the tags, `<` through `>`.
fn spans(prompt: &str) -> Vec<(usize, usize)> {
    let bytes = prompt.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'<' {
            let kind_len = bytes[i + 1..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                .count();
            let colon = i + 1 + kind_len;
            if kind_len > 0 && bytes.get(colon) == Some(&b':') {
                if let Some(close) = bytes[colon + 1..].iter().position(|b| *b == b'>') {
                    let end = colon + 1 + close + 1;
                    if close > 0 {
                        found.push((i, end));
                        i = end;
                        continue;
                    }
                }
            }
        }
        i += 1;
    }
    found
}

/// Reads the `<lora:...>` tags of a prompt as LoRA references (hashes empty):
/// `<lora:NAME>` is weight 1, `<lora:NAME:W>` both weights W, `<lora:NAME:U:T>` UNet
/// weight U and text-encoder weight T. The error names `field` and the tag.
pub fn lora_tags(field: &str, prompt: &str) -> Result<Vec<LoraRef>, FieldError> {
    let mut out = Vec::new();
    for tag in tags(prompt).into_iter().filter(|t| t.kind == "lora") {
        let weight = |s: &str| {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|w| w.is_finite())
                .ok_or_else(|| {
                    FieldError::new(
                        field,
                        format!(
                            "<lora:{}:...> has the weight {}, which is not a number",
                            tag.name,
                            quote(s)
                        ),
                    )
                })
        };
        let (unet_weight, te_weight) = match tag.args.as_slice() {
            [] => (1.0, 1.0),
            [w] => {
                let w = weight(w)?;
                (w, w)
            }
            [u, t, ..] => (weight(u)?, weight(t)?),
        };
        out.push(LoraRef {
            name: tag.name,
            hash: String::new(),
            unet_weight,
            te_weight,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_found_and_stripped() {
        let p = "<lora:mira-v3:0.8> a knight, <lora:ink:0.5:0.25> <hypernet:x:1>";
        let t = tags(p);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].name, "mira-v3");
        assert_eq!(t[1].args, vec!["0.5", "0.25"]);
        assert_eq!(strip(p), " a knight,  ");
        let l = lora_tags("prompt", p).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[1].unet_weight, l[1].te_weight), (0.5, 0.25));
    }

    #[test]
    fn not_tags_stay_text() {
        for p in ["a < b", "<:x>", "<lora:>", "a <lora:x", "<la la:x>"] {
            assert!(tags(p).is_empty(), "{p}");
            assert_eq!(strip(p), p);
        }
    }

    #[test]
    fn bad_weight_is_named() {
        let e = lora_tags("items[0].prompt", "<lora:x:heavy>").unwrap_err();
        assert!(e.to_string().contains("heavy"), "{e}");
    }

    #[test]
    fn hires_size_is_a_multiple_of_eight() {
        let h = Hires {
            scale: 1.5,
            steps: 10,
            denoise: 0.5,
            upscaler: Upscaler::Latent,
        };
        assert_eq!(h.target_size(64, 72), (96, 104));
        let h = Hires { scale: 2.0, ..h };
        assert_eq!(h.target_size(64, 64), (128, 128));
    }

    #[test]
    fn empty_extras_leave_the_json_alone() {
        let json = serde_json::to_string(&Extras::default()).unwrap();
        assert_eq!(json, "{}");
    }
}
