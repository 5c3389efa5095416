//! The recipe: everything that determines one image, its validation and its hash.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{FieldError, quote};
use crate::extras::Extras;

/// Smallest and largest image side in pixels.
pub const SIZE_RANGE: std::ops::RangeInclusive<u32> = 64..=2048;
/// Allowed number of denoising steps.
pub const STEPS_RANGE: std::ops::RangeInclusive<u32> = 1..=500;
/// Allowed classifier-free guidance scale.
pub const GUIDANCE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=50.0;
/// Longest prompt accepted, in bytes; long prompts are chunked by the encoder, not cut.
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

/// A denoising sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// DDIM (Song et al. 2020); deterministic with eta = 0.
    Ddim,
    /// Euler (Karras et al. 2022, Algorithm 2 without churn).
    Euler,
    /// Euler ancestral: Euler plus fresh noise every step.
    EulerA,
    /// DPM-Solver++ 2M (Lu et al. 2022), second-order multistep.
    #[serde(rename = "dpmpp_2m")]
    DpmPp2m,
}

impl Scheduler {
    /// Every scheduler, in the order `--help` lists them.
    pub const ALL: &'static [Scheduler] = &[
        Scheduler::Ddim,
        Scheduler::Euler,
        Scheduler::EulerA,
        Scheduler::DpmPp2m,
    ];

    /// Returns the name used in batch files and recipes.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Ddim => "ddim",
            Scheduler::Euler => "euler",
            Scheduler::EulerA => "euler_a",
            Scheduler::DpmPp2m => "dpmpp_2m",
        }
    }

    /// Returns the sampler name AUTOMATIC1111's web UI writes in PNG parameters.
    pub fn a1111_name(self, karras: bool) -> String {
        let base = match self {
            Scheduler::Ddim => "DDIM",
            Scheduler::Euler => "Euler",
            Scheduler::EulerA => "Euler a",
            Scheduler::DpmPp2m => "DPM++ 2M",
        };
        if karras {
            format!("{base} Karras")
        } else {
            base.to_string()
        }
    }

    /// Returns true for the samplers that work on Karras-style sigmas.
    pub fn takes_karras(self) -> bool {
        !matches!(self, Scheduler::Ddim)
    }

    /// Parses a batch-file scheduler name.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        Self::ALL
            .iter()
            .copied()
            .find(|s| s.name() == value)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|s| s.name()).collect();
                FieldError::new(
                    field,
                    format!(
                        "unknown scheduler {}; expected one of {}",
                        quote(value),
                        known.join(", ")
                    ),
                )
            })
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A complete, validated description of one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Catalog name of the model.
    pub model: String,
    /// Content hash of the model; empty when the farm did not know it at submission.
    pub model_hash: String,
    /// What to draw.
    pub prompt: String,
    /// What to steer away from: the unconditional branch of guidance.
    pub negative_prompt: String,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Sampler.
    pub scheduler: Scheduler,
    /// Karras sigma spacing (not for DDIM).
    pub karras: bool,
    /// DDIM eta; 0 unless the scheduler is DDIM.
    pub eta: f64,
    /// How much of the init image is repainted: 1.0 for txt2img.
    pub strength: f64,
    /// sha256 of the init image among the job's blobs.
    pub init_image: Option<String>,
    /// sha256 of the inpainting mask (white = repaint) among the job's blobs.
    pub mask: Option<String>,
    /// Seed of the img2img start noise when not `seed` (series shots share
    /// their anchor's noise). Left out of the JSON when absent, so the hashes
    /// of recipes without it do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_seed: Option<u64>,
    /// LoRAs, embeddings, ControlNets and hires fix, flattened into the JSON and
    /// left out when empty (older recipes keep their hashes).
    #[serde(flatten)]
    pub extras: Extras,
}

/// How a recipe uses images; tasks of different modes run different pipelines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// No init image.
    Txt2Img,
    /// An init image, no mask.
    Img2Img,
    /// An init image and a mask.
    Inpaint,
}

impl Mode {
    /// Returns the mode's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Txt2Img => "txt2img",
            Mode::Img2Img => "img2img",
            Mode::Inpaint => "inpaint",
        }
    }
}

/// What tasks must share to be denoised as one UNet batch: the model, the
/// latent size, the schedule (sampler, steps, Karras sigmas and, with an
/// init image, the strength that picks the first step), whether guidance
/// doubles the rows, and the mode. Seeds, prompts, guidance scales, DDIM eta
/// (each task steps its own sampler) and images may differ. A renderer may still split a batch where it must (prompts of
/// different chunk counts); tasks with different keys never share one.
///
/// The coordinator fills a worker's free slots with tasks of one key, and
/// its Redis store keeps the key's text ([`fmt::Display`]) with each task.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Catalog name of the model.
    pub model: String,
    /// The pinned model hash, if any.
    pub model_hash: String,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Sampler.
    pub scheduler: Scheduler,
    /// Karras sigmas.
    pub karras: bool,
    /// Classifier-free guidance on (`guidance > 1`): two UNet rows per task.
    pub guided: bool,
    /// txt2img, img2img or inpainting.
    pub mode: Mode,
    /// The strength as bits with an init image; 0 for txt2img, which ignores it.
    pub strength_bits: u64,
    /// [`Extras::digest`]: tasks with other LoRAs, embeddings, ControlNets or
    /// hires fix never share a batch. Empty without extras.
    pub extras: String,
}

impl fmt::Display for BatchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}|{}|{}x{}|{}|{}|{}|{}|{}|{}",
            self.model,
            self.model_hash,
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.karras,
            self.guided,
            self.mode.name(),
            f64::from_bits(self.strength_bits),
        )?;
        // Left out without extras, so keys of plain recipes read as before.
        if !self.extras.is_empty() {
            write!(f, "|{}", self.extras)?;
        }
        Ok(())
    }
}

impl Recipe {
    /// Returns how the recipe uses images.
    pub fn mode(&self) -> Mode {
        match (&self.init_image, &self.mask) {
            (None, _) => Mode::Txt2Img,
            (Some(_), None) => Mode::Img2Img,
            (Some(_), Some(_)) => Mode::Inpaint,
        }
    }

    /// Returns the key of the UNet batch this recipe can share.
    pub fn batch_key(&self) -> BatchKey {
        let mode = self.mode();
        BatchKey {
            model: self.model.clone(),
            model_hash: self.model_hash.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            scheduler: self.scheduler,
            karras: self.karras,
            guided: self.guidance > 1.0,
            mode,
            strength_bits: match mode {
                Mode::Txt2Img => 0,
                Mode::Img2Img | Mode::Inpaint => self.strength.to_bits(),
            },
            extras: self.extras.digest(),
        }
    }

    /// Checks every field; the error names the field (under `path`) and the value.
    pub fn validate(&self, path: &str) -> Result<(), FieldError> {
        let at = |field: &str| {
            if path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            }
        };
        check_model_name(&at("model"), &self.model)?;
        check_prompt_text(&at("prompt"), &self.prompt)?;
        check_prompt_text(&at("negative_prompt"), &self.negative_prompt)?;
        if self.prompt.len() > MAX_PROMPT_BYTES {
            return Err(FieldError::new(
                at("prompt"),
                format!(
                    "is {} bytes, more than the limit of {MAX_PROMPT_BYTES}",
                    self.prompt.len()
                ),
            ));
        }
        if self.negative_prompt.len() > MAX_PROMPT_BYTES {
            return Err(FieldError::new(
                at("negative_prompt"),
                format!(
                    "is {} bytes, more than the limit of {MAX_PROMPT_BYTES}",
                    self.negative_prompt.len()
                ),
            ));
        }
        check_side(&at("width"), self.width)?;
        check_side(&at("height"), self.height)?;
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
        if self.karras && !self.scheduler.takes_karras() {
            return Err(FieldError::new(
                at("karras"),
                format!(
                    "applies to euler, euler_a and dpmpp_2m, not {}",
                    self.scheduler
                ),
            ));
        }
        if !self.eta.is_finite() || !(0.0..=1.0).contains(&self.eta) {
            return Err(FieldError::new(
                at("eta"),
                format!("must be between 0 and 1, got {}", self.eta),
            ));
        }
        if self.eta != 0.0 && self.scheduler != Scheduler::Ddim {
            return Err(FieldError::new(
                at("eta"),
                format!("only ddim takes eta, not {}", self.scheduler),
            ));
        }
        if !self.strength.is_finite() || !(0.0..=1.0).contains(&self.strength) {
            return Err(FieldError::new(
                at("strength"),
                format!("must be between 0 and 1, got {}", self.strength),
            ));
        }
        for (field, value) in [("init_image", &self.init_image), ("mask", &self.mask)] {
            if let Some(sha) = value {
                check_sha256(&at(field), sha)?;
            }
        }
        if self.mask.is_some() && self.init_image.is_none() {
            return Err(FieldError::new(
                at("mask"),
                "needs an init_image to paint into",
            ));
        }
        if !self.guidance.is_finite() || !GUIDANCE_RANGE.contains(&self.guidance) {
            return Err(FieldError::new(
                at("guidance"),
                format!(
                    "must be between {} and {}, got {}",
                    GUIDANCE_RANGE.start(),
                    GUIDANCE_RANGE.end(),
                    self.guidance
                ),
            ));
        }
        self.extras.validate(at, self.width, self.height)
    }

    /// Returns the sha256 of every image the recipe refers to among its job's
    /// blobs: the init image, the mask, then each ControlNet's control image
    /// (each once, in that order).
    pub fn images(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let all = [&self.init_image, &self.mask]
            .into_iter()
            .flatten()
            .chain(self.extras.controlnets.iter().map(|c| &c.image));
        for sha in all {
            if !out.contains(sha) {
                out.push(sha.clone());
            }
        }
        out
    }

    /// Returns the size of the output image: the recipe's size, or with the hires
    /// fix the size of its second pass ([`crate::extras::Hires::target_size`]).
    pub fn output_size(&self) -> (u32, u32) {
        match &self.extras.hires {
            Some(h) => h.target_size(self.width, self.height),
            None => (self.width, self.height),
        }
    }

    /// Returns the stable hash of the recipe, hex: equal recipes render equal bytes.
    pub fn hash(&self) -> String {
        // serde_json writes struct fields in declaration order, so the text is canonical.
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

/// Longest name [`check_name`] accepts, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a name kiln uses in keys, paths and file names (a model, a project,
/// a series, a farm): 1 to [`MAX_NAME_LEN`] of `A-Z a-z 0-9 . _ -`, and not
/// `.` or `..`. The one naming rule: it keeps names safe as path segments and
/// Redis key parts, and free of the `|` and `:` separators kiln puts between
/// them.
pub fn check_name(path: &str, value: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            path,
            format!(
                "must be 1 to {MAX_NAME_LEN} letters, digits, '.', '_' or '-', and not \".\" or \"..\", got {}",
                quote(value)
            ),
        ))
    }
}

/// Checks a model catalog name: [`check_name`].
pub fn check_model_name(path: &str, name: &str) -> Result<(), FieldError> {
    check_name(path, name)
}

/// Checks prompt text: no control characters but tabs and line breaks. A NUL
/// or an escape sequence would end up in the PNG's text chunks and in
/// terminals that print them.
fn check_prompt_text(path: &str, text: &str) -> Result<(), FieldError> {
    match text
        .char_indices()
        .find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        Some((at, c)) => Err(FieldError::new(
            path,
            format!(
                "must not contain control characters other than tabs and line breaks; found U+{:04X} at byte {at} of {}",
                u32::from(c),
                quote(text)
            ),
        )),
        None => Ok(()),
    }
}

/// Checks a blob reference: 64 lowercase hex digits.
pub fn check_sha256(path: &str, value: &str) -> Result<(), FieldError> {
    let ok = value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            path,
            format!(
                "must be the sha256 of an image in the job (64 lowercase hex digits), got {}",
                quote(value)
            ),
        ))
    }
}

fn check_side(path: &str, value: u32) -> Result<(), FieldError> {
    if !value.is_multiple_of(8) || !SIZE_RANGE.contains(&value) {
        return Err(FieldError::new(
            path,
            format!(
                "must be a multiple of 8 between {} and {}, got {value}",
                SIZE_RANGE.start(),
                SIZE_RANGE.end()
            ),
        ));
    }
    Ok(())
}

/// Returns the output file name of item `index`: `<NNNNN>-<slug>.png`.
pub fn file_name(index: u32, prompt: &str) -> String {
    format!("{index:05}-{}.png", slug(prompt))
}

/// Returns the file name of a series task: `<NNNNN>-<series>-anchor.png`, or
/// `<NNNNN>-<series>-<shot, 2 digits>-<slug of the scene>.png` for shot 1 and on.
pub fn series_file_name(index: u32, series: &str, shot: u32, scene: &str) -> String {
    if shot == 0 {
        format!("{index:05}-{series}-anchor.png")
    } else {
        format!("{index:05}-{series}-{shot:02}-{}.png", slug(scene))
    }
}

/// Returns a short lowercase ASCII slug of a prompt: words joined by '-', at most 48 bytes.
pub fn slug(prompt: &str) -> String {
    const MAX: usize = 48;
    let mut out = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let extra = if out.is_empty() { 0 } else { 1 };
        if out.len() + extra + word.len() > MAX {
            if out.is_empty() {
                out.push_str(&word[..MAX].to_ascii_lowercase());
            }
            break;
        }
        if extra == 1 {
            out.push('-');
        }
        out.push_str(&word.to_ascii_lowercase());
    }
    if out.is_empty() {
        out.push_str("image");
    }
    out
}

/// Derives the seed of item `index` from a base seed: a pure function, so the
/// same (base, index) always gives the same seed whatever order work arrives in.
pub fn derive_seed(base: u64, index: u64) -> u64 {
    // SplitMix64 finaliser over the pair; the constants are Steele et al.'s.
    let mut z = base ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    // Keep seeds within i64 so every tool (TOML, A1111, JSON readers) can hold them.
    (z ^ (z >> 31)) & (i64::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe {
            model: "tiny".into(),
            model_hash: String::new(),
            prompt: "a red fox".into(),
            negative_prompt: String::new(),
            seed: 1,
            steps: 4,
            guidance: 5.0,
            width: 64,
            height: 64,
            scheduler: Scheduler::Ddim,
            karras: false,
            eta: 0.0,
            strength: 1.0,
            init_image: None,
            mask: None,
            noise_seed: None,
            extras: Default::default(),
        }
    }

    #[test]
    fn slugs_are_short_lowercase_words() {
        assert_eq!(
            slug("A red fox sitting on a mossy stone, watercolor"),
            "a-red-fox-sitting-on-a-mossy-stone-watercolor"
        );
        assert_eq!(slug("!!!"), "image");
        assert_eq!(slug(&"x".repeat(100)).len(), 48);
        assert!(slug("one two three four five six seven eight nine ten eleven twelve").len() <= 48);
        assert_eq!(
            file_name(7, "Lighthouse at dusk"),
            "00007-lighthouse-at-dusk.png"
        );
    }

    #[test]
    fn validation_names_field_and_value() {
        let mut r = recipe();
        r.width = 63;
        let e = r.validate("items[0]").unwrap_err();
        assert_eq!(e.path, "items[0].width");
        assert!(e.message.contains("63"), "{e}");
        let mut r = recipe();
        r.steps = 0;
        assert_eq!(r.validate("").unwrap_err().path, "steps");
        let mut r = recipe();
        r.guidance = f64::NAN;
        assert_eq!(r.validate("").unwrap_err().path, "guidance");
        assert!(recipe().validate("").is_ok());
    }

    #[test]
    fn scheduler_options_are_checked() {
        let mut r = recipe();
        r.karras = true;
        assert_eq!(r.validate("").unwrap_err().path, "karras");
        r.scheduler = Scheduler::DpmPp2m;
        assert!(r.validate("").is_ok());
        r.eta = 0.5;
        assert_eq!(r.validate("").unwrap_err().path, "eta");
        let mut r = recipe();
        r.eta = 1.5;
        assert_eq!(r.validate("").unwrap_err().path, "eta");
        let mut r = recipe();
        r.strength = -0.1;
        assert_eq!(r.validate("").unwrap_err().path, "strength");
        let mut r = recipe();
        r.mask = Some("ab".repeat(32));
        assert_eq!(r.validate("").unwrap_err().path, "mask");
        r.init_image = Some("not-a-hash".into());
        assert_eq!(r.validate("").unwrap_err().path, "init_image");
        assert_eq!(Scheduler::EulerA.a1111_name(true), "Euler a Karras");
        assert_eq!(
            Scheduler::parse("s", "dpmpp_2m").unwrap(),
            Scheduler::DpmPp2m
        );
    }

    #[test]
    fn control_characters_in_prompts_are_refused() {
        let mut r = recipe();
        r.prompt = "fox\u{0}cub".into();
        let e = r.validate("items[0]").unwrap_err();
        assert_eq!(e.path, "items[0].prompt");
        assert!(e.message.contains("U+0000"), "{e}");
        let mut r = recipe();
        r.negative_prompt = "blurry\u{1b}[31m".into();
        assert_eq!(r.validate("").unwrap_err().path, "negative_prompt");
        let mut r = recipe();
        r.prompt = "a fox,\tsitting\r\non a stone".into();
        assert!(r.validate("").is_ok(), "tabs and line breaks pass");
    }

    #[test]
    fn catalog_names_are_never_dot_folders() {
        for bad in [".", "..", "a/b", "", "x y", &"n".repeat(65)] {
            assert!(check_model_name("project", bad).is_err(), "{bad:?}");
        }
        for good in ["tiny", "sd-1.5", "...", ".hidden", "a..b"] {
            assert!(check_model_name("project", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn unknown_scheduler_lists_known_ones() {
        let e = Scheduler::parse("defaults.scheduler", "plms").unwrap_err();
        assert_eq!(e.path, "defaults.scheduler");
        assert!(e.message.contains("\"plms\"") && e.message.contains("ddim"));
    }

    #[test]
    fn hash_changes_with_any_field() {
        let a = recipe();
        let mut b = recipe();
        assert_eq!(a.hash(), b.hash());
        b.seed = 2;
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 64);
    }

    #[test]
    fn derived_seeds_are_pure_and_spread() {
        assert_eq!(derive_seed(777, 3), derive_seed(777, 3));
        let seeds: std::collections::HashSet<_> = (0..1000).map(|i| derive_seed(777, i)).collect();
        assert_eq!(seeds.len(), 1000);
        assert!(seeds.iter().all(|s| *s <= i64::MAX as u64));
    }

    #[test]
    fn batch_keys_split_what_cannot_share_a_unet_batch() {
        let base = recipe();
        let mut other_seed = base.clone();
        other_seed.seed += 1;
        other_seed.prompt = "another prompt".into();
        other_seed.guidance += 1.0;
        other_seed.eta = 0.5;
        assert_eq!(
            base.batch_key(),
            other_seed.batch_key(),
            "seeds, prompts, guidance scales and eta may differ"
        );
        let mut txt_strength = base.clone();
        txt_strength.strength = 0.5;
        assert_eq!(
            base.batch_key(),
            txt_strength.batch_key(),
            "txt2img ignores the strength"
        );
        let mut img = base.clone();
        img.init_image = Some("a".repeat(64));
        assert_ne!(base.batch_key(), img.batch_key(), "the mode differs");
        let mut weaker = img.clone();
        weaker.strength = 0.3;
        weaker.init_image = Some("b".repeat(64));
        assert_ne!(
            img.batch_key(),
            weaker.batch_key(),
            "img2img starts at a step the strength decides"
        );
        let mut unguided = base.clone();
        unguided.guidance = 1.0;
        assert_ne!(base.batch_key(), unguided.batch_key());
        assert_ne!(
            img.batch_key().to_string(),
            weaker.batch_key().to_string(),
            "the text keeps the strength too"
        );
    }

    #[test]
    fn names_follow_one_rule() {
        assert!(check_name("farm", "kiln-prod_1.a").is_ok());
        for bad in ["", "a|b", "a:b", "a/b", &"x".repeat(MAX_NAME_LEN + 1)] {
            let e = check_name("farm", bad).unwrap_err();
            assert_eq!(e.path, "farm");
        }
    }
}
