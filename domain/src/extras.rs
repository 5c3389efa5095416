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
use crate::recipe::{SIZE_RANGE, STEPS_RANGE, check_name};

/// Most LoRAs one recipe may apply (listed and tagged together).
pub const MAX_LORAS: usize = 32;
/// Most ControlNets one recipe may apply at once.
pub const MAX_CONTROLNETS: usize = 8;
/// Largest hires-fix factor; the smallest is just above 1.
pub const MAX_HIRES_SCALE: f64 = 4.0;
/// Range of a ControlNet's `scale` (A1111's "Control Weight" slider).
pub const CONTROL_SCALE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=2.0;
/// A1111's default hires denoising strength, when a batch file names none.
pub const DEFAULT_HIRES_DENOISE: f64 = 0.7;

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

    /// The one check of a recipe's extras, for a recipe of `width` x `height`:
    /// names follow [`check_name`], LoRA weights are finite, ControlNet scale,
    /// start and end lie in range (start before end), hashes are sha256 hex
    /// when set, and the hires fix scales by more than 1 and at most
    /// [`MAX_HIRES_SCALE`] to a size within [`SIZE_RANGE`] ([`Hires::target_size`]).
    /// `at(field)` turns `loras[0].name` into the caller's path.
    ///
    /// # Errors
    /// The first field that is wrong, quoting the value.
    pub fn validate(
        &self,
        at: impl Fn(&str) -> String,
        width: u32,
        height: u32,
    ) -> Result<(), FieldError> {
        if self.loras.len() > MAX_LORAS {
            return Err(FieldError::new(
                at("loras"),
                format!(
                    "names {} LoRAs, more than the limit of {MAX_LORAS}",
                    self.loras.len()
                ),
            ));
        }
        for (i, l) in self.loras.iter().enumerate() {
            check_name(&at(&format!("loras[{i}].name")), &l.name)?;
            if self.loras[..i].iter().any(|o| o.name == l.name) {
                return Err(FieldError::new(
                    at(&format!("loras[{i}].name")),
                    format!("LoRA {} is listed twice", quote(&l.name)),
                ));
            }
            check_hash(&at(&format!("loras[{i}].hash")), &l.hash)?;
            for (field, w) in [("unet_weight", l.unet_weight), ("te_weight", l.te_weight)] {
                if !w.is_finite() {
                    return Err(FieldError::new(
                        at(&format!("loras[{i}].{field}")),
                        format!("must be a finite number, got {w}"),
                    ));
                }
            }
        }
        for (i, e) in self.embeddings.iter().enumerate() {
            check_name(&at(&format!("embeddings[{i}].name")), &e.name)?;
            check_hash(&at(&format!("embeddings[{i}].hash")), &e.hash)?;
        }
        if self.controlnets.len() > MAX_CONTROLNETS {
            return Err(FieldError::new(
                at("controlnets"),
                format!(
                    "names {} ControlNets, more than the limit of {MAX_CONTROLNETS}",
                    self.controlnets.len()
                ),
            ));
        }
        for (i, c) in self.controlnets.iter().enumerate() {
            let field = |f: &str| at(&format!("controlnets[{i}].{f}"));
            check_name(&field("model"), &c.model)?;
            check_hash(&field("hash"), &c.hash)?;
            crate::recipe::check_sha256(&field("image"), &c.image)?;
            if !c.scale.is_finite() || !CONTROL_SCALE_RANGE.contains(&c.scale) {
                return Err(FieldError::new(
                    field("scale"),
                    format!(
                        "must be between {} and {}, got {}",
                        CONTROL_SCALE_RANGE.start(),
                        CONTROL_SCALE_RANGE.end(),
                        c.scale
                    ),
                ));
            }
            for (name, v) in [("start", c.start), ("end", c.end)] {
                if !v.is_finite() || !(0.0..=1.0).contains(&v) {
                    return Err(FieldError::new(
                        field(name),
                        format!("must be between 0 and 1, got {v}"),
                    ));
                }
            }
            if c.start >= c.end {
                return Err(FieldError::new(
                    field("end"),
                    format!(
                        "must be after start ({}), got {}: the ControlNet would never apply",
                        c.start, c.end
                    ),
                ));
            }
        }
        if let Some(h) = &self.hires {
            h.validate(|f| at(&format!("hires.{f}")), width, height)?;
        }
        Ok(())
    }

    /// Adds the LoRAs of a prompt's `<lora:...>` tags ([`lora_tags`]) to `loras`:
    /// a tag naming a listed LoRA replaces its weights in place (the tag wins), a
    /// new name is appended. `field` names the prompt in errors.
    ///
    /// # Errors
    /// A tag with a weight that is not a number or a name [`check_name`] refuses.
    pub fn add_prompt_loras(&mut self, field: &str, prompt: &str) -> Result<(), FieldError> {
        for tag in lora_tags(field, prompt)? {
            check_name(field, &tag.name).map_err(|e| {
                FieldError::new(field, format!("<lora:{}:...>: {}", tag.name, e.message))
            })?;
            match self.loras.iter_mut().find(|l| l.name == tag.name) {
                Some(listed) => {
                    listed.unet_weight = tag.unet_weight;
                    listed.te_weight = tag.te_weight;
                }
                None => self.loras.push(tag),
            }
        }
        Ok(())
    }

    /// A short digest of the extras (sha256 hex of their JSON, 16 digits), empty
    /// when there are none: what [`crate::recipe::BatchKey`] keeps of them.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        if self.is_empty() {
            return String::new();
        }
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(&Sha256::digest(&json)[..8])
    }
}

/// Checks a content hash: empty (not resolved yet) or 64 lowercase hex digits.
fn check_hash(path: &str, value: &str) -> Result<(), FieldError> {
    let ok = value.is_empty()
        || (value.len() == 64
            && value
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            path,
            format!(
                "must be a sha256 content hash (64 lowercase hex digits), got {}",
                quote(value)
            ),
        ))
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

    /// Checks the hires fix of a `width` x `height` recipe; `at(field)` names a field.
    ///
    /// # Errors
    /// The first field out of range, quoting the value.
    pub fn validate(
        &self,
        at: impl Fn(&str) -> String,
        width: u32,
        height: u32,
    ) -> Result<(), FieldError> {
        if !self.scale.is_finite() || self.scale <= 1.0 || self.scale > MAX_HIRES_SCALE {
            return Err(FieldError::new(
                at("scale"),
                format!(
                    "must be more than 1 and at most {MAX_HIRES_SCALE}, got {}",
                    self.scale
                ),
            ));
        }
        if !STEPS_RANGE.contains(&self.steps) {
            return Err(FieldError::new(
                at("steps"),
                format!(
                    "must be between {} and {}, got {}",
                    STEPS_RANGE.start(),
                    STEPS_RANGE.end(),
                    self.steps
                ),
            ));
        }
        if !self.denoise.is_finite() || !(0.0..=1.0).contains(&self.denoise) {
            return Err(FieldError::new(
                at("denoise"),
                format!("must be between 0 and 1, got {}", self.denoise),
            ));
        }
        let (w, h) = self.target_size(width, height);
        if !SIZE_RANGE.contains(&w) || !SIZE_RANGE.contains(&h) {
            return Err(FieldError::new(
                at("scale"),
                format!(
                    "{}x{height} scaled by {} is {w}x{h}; both sides must stay between {} and {}",
                    width,
                    self.scale,
                    SIZE_RANGE.start(),
                    SIZE_RANGE.end()
                ),
            ));
        }
        Ok(())
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

/// Returns the words of a prompt that may name a textual-inversion embedding:
/// its text without extra-network tags ([`strip`]), cut at every character a
/// name may not hold (see [`check_name`]: letters, digits, `.`, `_`, `-`).
/// `badhands` is found in `(badhands:1.2), blurry`.
pub fn embedding_words(prompt: &str) -> impl Iterator<Item = String> {
    strip(prompt)
        .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect::<Vec<_>>()
        .into_iter()
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
            if kind_len > 0
                && bytes.get(colon) == Some(&b':')
                && let Some(close) = bytes[colon + 1..].iter().position(|b| *b == b'>')
                && close > 0
            {
                let end = colon + 1 + close + 1;
                found.push((i, end));
                i = end;
                continue;
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
    fn embedding_words_skip_weights_and_tags() {
        let words: Vec<_> =
            embedding_words("(badhands:1.2), <lora:ink:1> blurry\nbad-eyes").collect();
        assert_eq!(words, ["badhands", "1.2", "blurry", "bad-eyes"]);
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
