//! A job as kiln speaks of it ([`JobSpec`]: defaults, a sweep, items, series
//! and the images they refer to) and its one validation ([`validate`]), which
//! the CLI's `--dry-run`, `kiln render` and the coordinator all run.
//!
//! The types mirror the `kiln.v1` messages of the same names; `kiln-proto`
//! converts between the two at the wire.

use crate::error::{FieldError, quote, segment};
use crate::extras::{ControlNetRef, Extras, Hires, LoraRef};
use crate::image::{check_image, sha256_hex};
use crate::recipe::{
    Recipe, SIZE_RANGE, STEPS_RANGE, Scheduler, check_model_name, derive_seed, file_name,
    series_file_name,
};

/// Most tasks one job may expand to.
pub const MAX_TASKS_PER_JOB: usize = 100_000;

/// Longest accepted job name and idempotency key, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;

/// The project of a job that names none.
pub const DEFAULT_PROJECT: &str = "default";

/// Recipe fields a batch may set, in recipe order.
pub const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "scheduler",
    "karras",
    "eta",
    "strength",
    "init_image",
    "mask",
    "loras",
    "controlnets",
    "hires",
];

/// Values used when neither the item, the sweep nor `[defaults]` sets a field.
pub mod builtin {
    /// Default denoising steps.
    pub const STEPS: u32 = 20;
    /// Default guidance scale.
    pub const GUIDANCE: f64 = 7.5;
    /// Default image side.
    pub const SIDE: u32 = 512;
    /// Default img2img strength (AUTOMATIC1111's default denoising strength).
    pub const STRENGTH: f64 = 0.75;
}

/// What a client submits: defaults, a sweep (cross product of its axes),
/// explicit items and series. Sweep tasks come first, in axis order (first
/// axis outermost), then the items in file order, then the series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSpec {
    /// A label for people, for example the batch file's name.
    pub name: String,
    /// Owner project; empty means [`DEFAULT_PROJECT`].
    pub project: String,
    /// Higher runs first.
    pub priority: i32,
    /// Fields every task starts from.
    pub defaults: RecipeFields,
    /// Swept fields.
    pub sweep: Vec<SweepAxis>,
    /// Explicit tasks.
    pub items: Vec<RecipeFields>,
    /// Images the recipes refer to by sha256.
    pub blobs: Vec<Blob>,
    /// Character-consistent series, after the sweep and the items.
    pub series: Vec<SeriesSpec>,
    /// URLs to POST to when the job ends (see [`crate::webhook`]).
    pub notify: Vec<String>,
}

impl JobSpec {
    /// Returns the job's project: its own, or [`DEFAULT_PROJECT`].
    pub fn project_or_default(&self) -> &str {
        if self.project.is_empty() {
            DEFAULT_PROJECT
        } else {
            &self.project
        }
    }
}

/// Recipe fields as a user wrote them: every field optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecipeFields {
    /// Catalog name of the model.
    pub model: Option<String>,
    /// What to draw.
    pub prompt: Option<String>,
    /// What to steer away from.
    pub negative_prompt: Option<String>,
    /// Seed of the initial noise.
    pub seed: Option<u64>,
    /// Denoising steps.
    pub steps: Option<u32>,
    /// Classifier-free guidance scale.
    pub guidance: Option<f64>,
    /// Image width in pixels.
    pub width: Option<u32>,
    /// Image height in pixels.
    pub height: Option<u32>,
    /// Sampler name.
    pub scheduler: Option<String>,
    /// Karras sigma spacing.
    pub karras: Option<bool>,
    /// DDIM eta.
    pub eta: Option<f64>,
    /// img2img strength.
    pub strength: Option<f64>,
    /// sha256 of a blob of the job.
    pub init_image: Option<String>,
    /// sha256 of a blob of the job.
    pub mask: Option<String>,
    /// LoRAs (hashes empty: admission resolves them); `<lora:...>` tags of the
    /// prompt are added at expansion.
    pub loras: Option<Vec<LoraRef>>,
    /// ControlNets, each with the sha256 of its control image among the blobs.
    pub controlnets: Option<Vec<ControlNetRef>>,
    /// The hires fix.
    pub hires: Option<Hires>,
}

/// One value of a sweep axis.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldValue {
    /// A string.
    Text(String),
    /// A whole number.
    Integer(i64),
    /// A floating-point number.
    Number(f64),
    /// A boolean.
    Flag(bool),
    /// A list of LoRAs (`loras = [[], [{ name = "ink", weight = 0.7 }]]`).
    Loras(Vec<LoraRef>),
    /// A list of ControlNets.
    ControlNets(Vec<ControlNetRef>),
    /// A hires fix.
    Hires(Hires),
}

/// One swept recipe field and the values it takes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepAxis {
    /// Recipe field name, for example `prompt` or `seed`.
    pub field: String,
    /// The values, in order.
    pub values: Vec<FieldValue>,
    /// Axes with the same non-empty zip name advance together instead of
    /// being crossed; they must have the same number of values.
    pub zip: String,
}

/// A series: shots of one character.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeriesSpec {
    /// Names the series in file names and the contact sheet's folder.
    pub name: String,
    /// The character description; every shot's prompt starts with it.
    pub character: String,
    /// Settings shared by the anchor and every shot; `seed` is the series seed.
    pub defaults: RecipeFields,
    /// First render the character alone, and start every shot from that image.
    pub anchor: bool,
    /// How much of the anchor (or reference image) each shot keeps, 0..1.
    pub consistency: Option<f64>,
    /// sha256 of a blob: a character reference that replaces the anchor render.
    pub reference_image: Option<String>,
    /// The shots: `prompt` is the scene; other fields override the series settings.
    pub shots: Vec<RecipeFields>,
}

/// Bytes a recipe refers to by sha256 (init images, masks), sent once per job.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    /// sha256 of `data`, hex.
    pub sha256: String,
    /// A PNG or JPEG file.
    pub data: Vec<u8>,
}

impl Blob {
    /// Returns a blob for `data`, hashing it.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            sha256: sha256_hex(&data),
            data,
        }
    }
}

// Image bytes would flood a log line: show the size instead.
impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("sha256", &self.sha256)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Checks every blob of a spec: the hash matches the bytes, and the bytes are an image.
///
/// # Errors
/// The first blob whose hash or image is wrong, as `blobs[i]`.
pub fn check_blobs(blobs: &[Blob]) -> Result<(), FieldError> {
    for (i, b) in blobs.iter().enumerate() {
        let path = format!("blobs[{i}]");
        let actual = sha256_hex(&b.data);
        if actual != b.sha256 {
            return Err(FieldError::new(
                path,
                format!("sha256 is {actual}, not {}", quote(&b.sha256)),
            ));
        }
        check_image(&path, &b.data)?;
    }
    Ok(())
}

/// Checks a label for people (a job name, an idempotency key): at most
/// [`MAX_LABEL_BYTES`] bytes, no control characters.
///
/// # Errors
/// The field, quoting the value.
pub fn check_label(field: &str, value: &str) -> Result<(), FieldError> {
    if value.len() > MAX_LABEL_BYTES {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes, more than the limit of {MAX_LABEL_BYTES}: {}",
                value.len(),
                quote(value)
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            format!("must not contain control characters, got {}", quote(value)),
        ));
    }
    Ok(())
}

/// Converts a whole number written for the integer recipe field `field`
/// (`seed`, `steps`, `width` or `height`) at `path`.
///
/// # Errors
/// A value the field's type cannot hold, with the range the field accepts.
pub fn integer_field(path: &str, field: &str, value: i64) -> Result<u64, FieldError> {
    let max = if field == "seed" {
        i64::MAX as u64
    } else {
        u64::from(u32::MAX)
    };
    match u64::try_from(value) {
        Ok(v) if v <= max => Ok(v),
        _ => {
            // Say the range the recipe accepts, not the one of the wire type.
            let message = match field {
                "steps" => format!(
                    "must be between {} and {}, got {value}",
                    STEPS_RANGE.start(),
                    STEPS_RANGE.end()
                ),
                "width" | "height" => format!(
                    "must be a multiple of 8 between {} and {}, got {value}",
                    SIZE_RANGE.start(),
                    SIZE_RANGE.end()
                ),
                _ => format!("must be between 0 and {max}, got {value}"),
            };
            Err(FieldError::new(path, message))
        }
    }
}

/// One task of an expanded job.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpandedItem {
    /// Position in the job: sweep tasks first, then items, then series.
    pub index: u32,
    /// The complete recipe. A shot that starts from its anchor gets its
    /// `init_image` when the anchor is done.
    pub recipe: Recipe,
    /// Output file name.
    pub file_name: String,
    /// Where the task sits in a series, for series tasks.
    pub series: Option<SeriesPlace>,
}

/// A task's place in a series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeriesPlace {
    /// The series' name.
    pub name: String,
    /// Shot number from 1; 0 for the anchor.
    pub shot: u32,
    /// Index of the anchor task this shot starts from.
    pub depends_on: Option<u32>,
}

/// Default share of the anchor a shot keeps.
pub const DEFAULT_CONSISTENCY: f64 = 0.5;

/// The one validation of a job: checks the project (the catalog name rule),
/// the name, the webhook URLs, the blobs and every recipe field, and expands the spec into its
/// tasks. `kiln submit --dry-run`, `kiln render` and the coordinator all call
/// this, so what one accepts the others accept.
///
/// Items without a seed get `derive_seed(seed_base, index)`, so the chosen seed
/// is a pure function of the job's base and the item's position.
///
/// # Errors
/// The first invalid field, named by where the user set it (`project`,
/// `sweep.seed[2]`, `items[0].width`, `defaults.steps`).
pub fn validate(spec: &JobSpec, seed_base: u64) -> Result<Vec<ExpandedItem>, FieldError> {
    if !spec.project.is_empty() {
        check_model_name("project", &spec.project)?;
    }
    check_label("name", &spec.name)?;
    crate::webhook::check_targets(&spec.notify)?;
    check_blobs(&spec.blobs)?;
    expand(spec, seed_base)
}

/// Expands `spec` into its tasks, validating every recipe field.
fn expand(spec: &JobSpec, seed_base: u64) -> Result<Vec<ExpandedItem>, FieldError> {
    let defaults = &spec.defaults;
    let combos = sweep_combinations(&spec.sweep)?;
    let series_tasks: usize = spec
        .series
        .iter()
        .map(|s| s.shots.len() + usize::from(s.anchor && s.reference_image.is_none()))
        .sum();
    let total = combos.len() + spec.items.len() + series_tasks;
    if total == 0 {
        return Err(FieldError::new(
            "items",
            "the job has no items: add a [sweep], [[items]] or a [series.NAME]",
        ));
    }
    if total > MAX_TASKS_PER_JOB {
        return Err(FieldError::new(
            "sweep",
            format!("the job expands to {total} tasks, more than the limit of {MAX_TASKS_PER_JOB}"),
        ));
    }
    let mut out = Vec::with_capacity(total);
    for combo in combos {
        let mut layer = Layered::new(defaults);
        for (axis, value_index) in combo {
            let axis = &spec.sweep[axis];
            let path = format!("sweep.{}[{value_index}]", segment(&axis.field));
            set_field(
                &mut layer.fields,
                &axis.field,
                &axis.values[value_index],
                &path,
            )?;
            layer.set_origin(&axis.field, path, false);
        }
        let index = out.len() as u32;
        let recipe = layer.finish(seed_base, index, "sweep", &spec.blobs)?;
        out.push(ExpandedItem {
            index,
            file_name: file_name(index, &recipe.prompt),
            recipe,
            series: None,
        });
    }
    for (i, item) in spec.items.iter().enumerate() {
        let mut layer = Layered::new(defaults);
        layer.overlay(item, &format!("items[{i}]"), false);
        let index = out.len() as u32;
        let recipe = layer.finish(seed_base, index, &format!("items[{i}]"), &spec.blobs)?;
        out.push(ExpandedItem {
            index,
            file_name: file_name(index, &recipe.prompt),
            recipe,
            series: None,
        });
    }
    for (i, series) in spec.series.iter().enumerate() {
        if spec.series[..i].iter().any(|s| s.name == series.name) {
            return Err(FieldError::new(
                format!("series.{}", segment(&series.name)),
                "is defined twice",
            ));
        }
        expand_series(series, defaults, seed_base, &spec.blobs, &mut out)?;
    }
    Ok(out)
}

/// Appends a series' tasks: the anchor (with `anchor` and no reference
/// image), then every shot. A shot's prompt is the character joined with its
/// scene; its seed is `derive_seed(series seed, shot number)` unless it sets
/// one; with an anchor or a reference image it is img2img at strength
/// `1 - consistency` with the series seed's noise, shared by every shot.
fn expand_series(
    series: &SeriesSpec,
    defaults: &RecipeFields,
    seed_base: u64,
    blobs: &[Blob],
    out: &mut Vec<ExpandedItem>,
) -> Result<(), FieldError> {
    let path = format!("series.{}", segment(&series.name));
    check_series_name(&path, &series.name)?;
    if series.character.trim().is_empty() {
        return Err(FieldError::new(
            format!("{path}.character"),
            "missing: describe the character",
        ));
    }
    if series.shots.is_empty() {
        return Err(FieldError::new(
            format!("{path}.shots"),
            "the series has no shots: add [[series.NAME.shots]]",
        ));
    }
    let consistency = series.consistency.unwrap_or(DEFAULT_CONSISTENCY);
    if !consistency.is_finite() || !(0.0..=1.0).contains(&consistency) {
        return Err(FieldError::new(
            format!("{path}.consistency"),
            format!("must be between 0 and 1, got {consistency}"),
        ));
    }
    let reference = series.reference_image.clone();
    if let Some(sha) = &reference
        && !blobs.iter().any(|b| &b.sha256 == sha)
    {
        return Err(FieldError::new(
            format!("{path}.reference_image"),
            format!("no image with sha256 {} was sent with the job", quote(sha)),
        ));
    }
    let mut base = Layered::new(defaults);
    base.overlay(&series.defaults, &path, true);
    let first = out.len() as u32;
    let seed = base
        .fields
        .seed
        .unwrap_or_else(|| derive_seed(seed_base, u64::from(first)));
    base.fields.seed = Some(seed);
    let mut anchor_index = None;
    if series.anchor && reference.is_none() {
        let mut layer = base.clone();
        layer.fields.prompt = Some(series.character.clone());
        layer.set_origin("prompt", format!("{path}.character"), false);
        let index = out.len() as u32;
        let recipe = layer.finish(seed_base, index, &path, blobs)?;
        out.push(ExpandedItem {
            index,
            file_name: series_file_name(index, &series.name, 0, ""),
            recipe,
            series: Some(SeriesPlace {
                name: series.name.clone(),
                shot: 0,
                depends_on: None,
            }),
        });
        anchor_index = Some(index);
    }
    for (i, shot) in series.shots.iter().enumerate() {
        let number = i as u32 + 1;
        let shot_path = format!("{path}.shots[{i}]");
        let mut layer = base.clone();
        layer.fields.seed = None;
        layer.overlay(shot, &shot_path, false);
        let scene = shot.prompt.clone().unwrap_or_default();
        layer.fields.prompt = Some(if scene.trim().is_empty() {
            series.character.clone()
        } else {
            format!("{}, {scene}", series.character)
        });
        if layer.fields.seed.is_none() {
            layer.fields.seed = Some(derive_seed(seed, u64::from(number)));
            layer.set_origin("seed", format!("{path}.seed"), false);
        }
        let starts_from_image = anchor_index.is_some() || reference.is_some();
        if starts_from_image {
            layer.fields.strength = Some(1.0 - consistency);
            layer.set_origin("strength", format!("{path}.consistency"), false);
            if let Some(sha) = &reference {
                layer.fields.init_image = Some(sha.clone());
                layer.set_origin("init_image", format!("{path}.reference_image"), false);
            }
            layer.init_pending = anchor_index.is_some();
        }
        let index = out.len() as u32;
        let mut recipe = layer.finish(seed_base, index, &shot_path, blobs)?;
        if starts_from_image {
            recipe.noise_seed = Some(seed);
        }
        out.push(ExpandedItem {
            index,
            file_name: series_file_name(index, &series.name, number, &scene),
            recipe,
            series: Some(SeriesPlace {
                name: series.name.clone(),
                shot: number,
                depends_on: anchor_index,
            }),
        });
    }
    Ok(())
}

/// Checks a series name: it names files and a folder, so it follows the
/// catalog name rule (which refuses `.` and `..`).
fn check_series_name(path: &str, name: &str) -> Result<(), FieldError> {
    check_model_name(path, name).map_err(|_| {
        FieldError::new(
            path,
            format!(
                "the series name must be 1 to 64 letters, digits, '.', '_' or '-', and not \".\" or \"..\", got {}",
                quote(name)
            ),
        )
    })
}

/// Returns where in `spec` the model `name` is written (`sweep.model[1]`,
/// `items[0].model`, `series.NAME.shots[2].model`, `series.NAME.model` or
/// `defaults.model`), for errors about that model.
pub fn model_field(spec: &JobSpec, name: &str) -> String {
    for axis in spec.sweep.iter().filter(|a| a.field == "model") {
        if let Some(i) = axis
            .values
            .iter()
            .position(|v| matches!(v, FieldValue::Text(t) if t == name))
        {
            return format!("sweep.model[{i}]");
        }
    }
    if let Some(i) = spec
        .items
        .iter()
        .position(|it| it.model.as_deref() == Some(name))
    {
        return format!("items[{i}].model");
    }
    for series in &spec.series {
        let path = format!("series.{}", segment(&series.name));
        if let Some(i) = series
            .shots
            .iter()
            .position(|shot| shot.model.as_deref() == Some(name))
        {
            return format!("{path}.shots[{i}].model");
        }
        if series.defaults.model.as_deref() == Some(name) {
            return format!("{path}.model");
        }
    }
    "defaults.model".to_string()
}

/// LoRAs or ControlNets, for [`extra_field`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraKind {
    /// A LoRA (listed in `loras` or tagged `<lora:NAME:W>` in a prompt).
    Lora,
    /// A ControlNet (`controlnets[i].model`).
    ControlNet,
}

/// Returns where in `spec` the LoRA or ControlNet `name` is written
/// (`items[0].loras[1].name`, `sweep.loras[1][0].name`, `items[2].prompt`
/// for a `<lora:...>` tag, `series.NAME.shots[0].controlnets[0].model`,
/// `defaults.controlnets[0].model`, ...), for errors about that name.
pub fn extra_field(spec: &JobSpec, kind: ExtraKind, name: &str) -> String {
    let tagged = |text: &str| {
        kind == ExtraKind::Lora
            && crate::extras::tags(text)
                .iter()
                .any(|t| t.kind == "lora" && t.name == name)
    };
    let in_loras = |list: &[LoraRef]| {
        (kind == ExtraKind::Lora)
            .then(|| list.iter().position(|l| l.name == name))
            .flatten()
            .map(|i| format!("[{i}].name"))
    };
    let in_controlnets = |list: &[ControlNetRef]| {
        (kind == ExtraKind::ControlNet)
            .then(|| list.iter().position(|c| c.model == name))
            .flatten()
            .map(|i| format!("[{i}].model"))
    };
    let in_fields = |f: &RecipeFields, prefix: &str| -> Option<String> {
        if let Some(at) = f.loras.as_deref().and_then(in_loras) {
            return Some(format!("{prefix}.loras{at}"));
        }
        if let Some(at) = f.controlnets.as_deref().and_then(in_controlnets) {
            return Some(format!("{prefix}.controlnets{at}"));
        }
        f.prompt
            .as_deref()
            .is_some_and(tagged)
            .then(|| format!("{prefix}.prompt"))
    };
    for axis in &spec.sweep {
        for (v, value) in axis.values.iter().enumerate() {
            let at = match value {
                FieldValue::Loras(l) => in_loras(l),
                FieldValue::ControlNets(c) => in_controlnets(c),
                FieldValue::Text(t) if axis.field == "prompt" && tagged(t) => Some(String::new()),
                _ => None,
            };
            if let Some(at) = at {
                return format!("sweep.{}[{v}]{at}", segment(&axis.field));
            }
        }
    }
    for (i, item) in spec.items.iter().enumerate() {
        if let Some(at) = in_fields(item, &format!("items[{i}]")) {
            return at;
        }
    }
    for series in &spec.series {
        let path = format!("series.{}", segment(&series.name));
        for (i, shot) in series.shots.iter().enumerate() {
            if let Some(at) = in_fields(shot, &format!("{path}.shots[{i}]")) {
                return at;
            }
        }
        if tagged(&series.character) {
            return format!("{path}.character");
        }
        if let Some(at) = in_fields(&series.defaults, &path) {
            return at;
        }
    }
    in_fields(&spec.defaults, "defaults").unwrap_or_else(|| match kind {
        ExtraKind::Lora => "loras".to_string(),
        ExtraKind::ControlNet => "controlnets".to_string(),
    })
}

/// Returns every combination of the sweep as (axis index, value index) pairs:
/// zipped axes advance together, groups are crossed with the first outermost.
fn sweep_combinations(axes: &[SweepAxis]) -> Result<Vec<Vec<(usize, usize)>>, FieldError> {
    if axes.is_empty() {
        return Ok(Vec::new());
    }
    // Groups of axis indices, in order of first appearance.
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, axis) in axes.iter().enumerate() {
        let path = format!("sweep.{}", segment(&axis.field));
        if !FIELDS.contains(&axis.field.as_str()) {
            return Err(unknown_field(&path, &axis.field));
        }
        if axes[..i].iter().any(|a| a.field == axis.field) {
            return Err(FieldError::new(path, "is swept twice"));
        }
        if axis.values.is_empty() {
            return Err(FieldError::new(path, "must list at least one value"));
        }
        match groups
            .iter_mut()
            .find(|(zip, _)| !axis.zip.is_empty() && *zip == axis.zip)
        {
            Some((_, members)) => {
                let first = &axes[members[0]];
                if first.values.len() != axis.values.len() {
                    return Err(FieldError::new(
                        path,
                        format!(
                            "is zipped with {} ({} values) but has {} values",
                            first.field,
                            first.values.len(),
                            axis.values.len()
                        ),
                    ));
                }
                members.push(i);
            }
            None => groups.push((axis.zip.clone(), vec![i])),
        }
    }
    let mut total: usize = 1;
    for (_, members) in &groups {
        total = total.saturating_mul(axes[members[0]].values.len());
    }
    if total > MAX_TASKS_PER_JOB {
        return Err(FieldError::new(
            "sweep",
            format!("expands to {total} tasks, more than the limit of {MAX_TASKS_PER_JOB}"),
        ));
    }
    let mut combos: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
    for (_, members) in &groups {
        let len = axes[members[0]].values.len();
        combos = combos
            .into_iter()
            .flat_map(|prefix| {
                (0..len).map(move |v| {
                    let mut c = prefix.clone();
                    c.extend(members.iter().map(|&a| (a, v)));
                    c
                })
            })
            .collect();
    }
    Ok(combos)
}

fn unknown_field(path: &str, field: &str) -> FieldError {
    FieldError::new(
        path,
        format!(
            "unknown recipe field {}; expected one of {}",
            quote(field),
            FIELDS.join(", ")
        ),
    )
}

/// Sets one recipe field from a sweep value, checking its type.
fn set_field(
    fields: &mut RecipeFields,
    name: &str,
    value: &FieldValue,
    path: &str,
) -> Result<(), FieldError> {
    let text = || match value {
        FieldValue::Text(s) => Ok(s.clone()),
        other => Err(FieldError::new(
            path,
            format!("expected text, got {}", describe(other)),
        )),
    };
    let integer = || match value {
        FieldValue::Integer(i) => integer_field(path, name, *i),
        other => Err(FieldError::new(
            path,
            format!("expected an integer, got {}", describe(other)),
        )),
    };
    let number = || match value {
        FieldValue::Number(n) => Ok(*n),
        FieldValue::Integer(i) => Ok(*i as f64),
        other => Err(FieldError::new(
            path,
            format!("expected a number, got {}", describe(other)),
        )),
    };
    // integer_field keeps steps, width and height within u32.
    let small = || integer().map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    match name {
        "model" => fields.model = Some(text()?),
        "prompt" => fields.prompt = Some(text()?),
        "negative_prompt" => fields.negative_prompt = Some(text()?),
        "scheduler" => fields.scheduler = Some(text()?),
        "init_image" => fields.init_image = Some(text()?),
        "mask" => fields.mask = Some(text()?),
        "karras" => {
            fields.karras = Some(match value {
                FieldValue::Flag(b) => *b,
                other => {
                    return Err(FieldError::new(
                        path,
                        format!("expected true or false, got {}", describe(other)),
                    ));
                }
            })
        }
        "seed" => fields.seed = Some(integer()?),
        "steps" => fields.steps = Some(small()?),
        "width" => fields.width = Some(small()?),
        "height" => fields.height = Some(small()?),
        "guidance" => fields.guidance = Some(number()?),
        "eta" => fields.eta = Some(number()?),
        "strength" => fields.strength = Some(number()?),
        "loras" => match value {
            FieldValue::Loras(l) => fields.loras = Some(l.clone()),
            other => {
                return Err(FieldError::new(
                    path,
                    format!("expected a list of LoRAs, got {}", describe(other)),
                ));
            }
        },
        "controlnets" => match value {
            FieldValue::ControlNets(c) => fields.controlnets = Some(c.clone()),
            other => {
                return Err(FieldError::new(
                    path,
                    format!("expected a list of ControlNets, got {}", describe(other)),
                ));
            }
        },
        "hires" => match value {
            FieldValue::Hires(h) => fields.hires = Some(h.clone()),
            other => {
                return Err(FieldError::new(
                    path,
                    format!("expected a hires fix table, got {}", describe(other)),
                ));
            }
        },
        other => return Err(unknown_field(path, other)),
    }
    Ok(())
}

fn describe(value: &FieldValue) -> String {
    match value {
        FieldValue::Text(s) => format!("text {}", quote(s)),
        FieldValue::Integer(i) => format!("integer {i}"),
        FieldValue::Number(n) => format!("number {n}"),
        FieldValue::Flag(b) => format!("boolean {b}"),
        FieldValue::Loras(l) => format!("a list of {} LoRAs", l.len()),
        FieldValue::ControlNets(c) => format!("a list of {} ControlNets", c.len()),
        FieldValue::Hires(_) => "a hires fix".to_string(),
    }
}

/// A recipe under construction that remembers where each field was set.
#[derive(Clone)]
struct Layered {
    fields: RecipeFields,
    /// Path of the value of each field in `FIELDS` order; None = built-in default.
    origins: [Option<String>; FIELDS.len()],
    /// The strength comes from settings shared by several tasks (`[defaults]`,
    /// a series' settings): it applies to those that start from an image, and
    /// the others render from text without complaint.
    strength_shared: bool,
    /// The init image comes later (a shot waiting for its anchor): keep the strength.
    init_pending: bool,
}

impl Layered {
    fn new(defaults: &RecipeFields) -> Self {
        let mut layer = Self {
            fields: RecipeFields::default(),
            origins: Default::default(),
            strength_shared: false,
            init_pending: false,
        };
        layer.overlay(defaults, "defaults", true);
        layer
    }

    fn set_origin(&mut self, field: &str, path: String, shared: bool) {
        if field == "strength" {
            self.strength_shared = shared;
        }
        if let Some(i) = FIELDS.iter().position(|f| *f == field) {
            self.origins[i] = Some(path);
        }
    }

    /// Puts the fields `top` sets over the current ones; `shared` when `top`
    /// holds settings for several tasks.
    fn overlay(&mut self, top: &RecipeFields, prefix: &str, shared: bool) {
        macro_rules! take {
            ($($f:ident),*) => {$(
                if let Some(v) = &top.$f {
                    self.fields.$f = Some(v.clone());
                    self.set_origin(stringify!($f), format!("{prefix}.{}", stringify!($f)), shared);
                }
            )*};
        }
        take!(
            model,
            prompt,
            negative_prompt,
            seed,
            steps,
            guidance,
            width,
            height,
            scheduler,
            karras,
            eta,
            strength,
            init_image,
            mask,
            loras,
            controlnets,
            hires
        );
    }

    fn origin(&self, field: &str, fallback: &str) -> String {
        FIELDS
            .iter()
            .position(|f| *f == field)
            .and_then(|i| self.origins[i].clone())
            .unwrap_or_else(|| format!("{fallback}.{field}"))
    }

    /// Where a path below a field was set: `controlnets[1].scale` under the
    /// origin of `controlnets`.
    fn origin_of_path(&self, path: &str, fallback: &str) -> String {
        let cut = path.find(['.', '[']).unwrap_or(path.len());
        let (head, rest) = path.split_at(cut);
        format!("{}{rest}", self.origin(head, fallback))
    }

    fn finish(
        self,
        seed_base: u64,
        index: u32,
        fallback: &str,
        blobs: &[Blob],
    ) -> Result<Recipe, FieldError> {
        let f = &self.fields;
        let missing = |field: &str| {
            FieldError::new(
                format!("{fallback}.{field}"),
                format!("missing: set {field} in the item, the sweep or [defaults]"),
            )
        };
        let scheduler = match &f.scheduler {
            Some(s) => Scheduler::parse(&self.origin("scheduler", fallback), s)?,
            None => Scheduler::Ddim,
        };
        let from_image = f.init_image.is_some() || self.init_pending;
        if let Some(strength) = f.strength {
            // Checked where it is written, even for a task that ignores it.
            if !strength.is_finite() || !(0.0..=1.0).contains(&strength) {
                return Err(FieldError::new(
                    self.origin("strength", fallback),
                    format!("must be between 0 and 1, got {strength}"),
                ));
            }
            if !from_image && !self.strength_shared {
                return Err(FieldError::new(
                    self.origin("strength", fallback),
                    format!(
                        "is {strength}, but the task has no init_image: strength applies to img2img only (txt2img renders at strength 1)"
                    ),
                ));
            }
        }
        let mut recipe = Recipe {
            model: f.model.clone().ok_or_else(|| missing("model"))?,
            model_hash: String::new(),
            prompt: f.prompt.clone().ok_or_else(|| missing("prompt"))?,
            negative_prompt: f.negative_prompt.clone().unwrap_or_default(),
            seed: f
                .seed
                .unwrap_or_else(|| derive_seed(seed_base, u64::from(index))),
            steps: f.steps.unwrap_or(builtin::STEPS),
            guidance: f.guidance.unwrap_or(builtin::GUIDANCE),
            width: f.width.unwrap_or(builtin::SIDE),
            height: f.height.unwrap_or(builtin::SIDE),
            scheduler,
            karras: f.karras.unwrap_or(false),
            eta: f.eta.unwrap_or(0.0),
            // txt2img is img2img at strength 1: the same render, the same hash.
            strength: if from_image {
                f.strength.unwrap_or(builtin::STRENGTH)
            } else {
                1.0
            },
            init_image: f.init_image.clone(),
            mask: f.mask.clone(),
            noise_seed: None,
            extras: Extras {
                loras: f.loras.clone().unwrap_or_default(),
                embeddings: Vec::new(),
                controlnets: f.controlnets.clone().unwrap_or_default(),
                hires: f.hires.clone(),
            },
        };
        recipe
            .extras
            .add_prompt_loras(&self.origin("prompt", fallback), &recipe.prompt)?;
        let controls = recipe
            .extras
            .controlnets
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("controlnets[{i}].image"), Some(&c.image)));
        for (field, value) in [
            ("init_image".to_string(), recipe.init_image.as_ref()),
            ("mask".to_string(), recipe.mask.as_ref()),
        ]
        .into_iter()
        .chain(controls)
        {
            if let Some(sha) = value
                && !blobs.iter().any(|b| &b.sha256 == sha)
            {
                return Err(FieldError::new(
                    self.origin_of_path(&field, fallback),
                    format!("no image with sha256 {} was sent with the job", quote(sha)),
                ));
            }
        }
        if recipe.seed > i64::MAX as u64 {
            return Err(FieldError::new(
                self.origin("seed", fallback),
                format!("must be between 0 and {}, got {}", i64::MAX, recipe.seed),
            ));
        }
        recipe
            .validate("")
            .map_err(|e| FieldError::new(self.origin_of_path(&e.path, fallback), e.message))?;
        // A malformed weight or `AND` is refused here, not found by a worker mid-job.
        crate::prompt::parse_field(
            &self.origin("prompt", fallback),
            &recipe.prompt,
            recipe.steps,
        )?;
        crate::prompt::parse_field(
            &self.origin("negative_prompt", fallback),
            &recipe.negative_prompt,
            recipe.steps,
        )?;
        Ok(recipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> FieldValue {
        FieldValue::Text(s.into())
    }
    fn int(i: i64) -> FieldValue {
        FieldValue::Integer(i)
    }
    fn axis(field: &str, values: Vec<FieldValue>, zip: &str) -> SweepAxis {
        SweepAxis {
            field: field.into(),
            values,
            zip: zip.into(),
        }
    }

    /// The batch file of issue #2: 2 prompts x 4 seeds, plus one item.
    fn issue_spec() -> JobSpec {
        JobSpec {
            defaults: RecipeFields {
                model: Some("tiny".into()),
                width: Some(64),
                height: Some(64),
                steps: Some(4),
                guidance: Some(5.0),
                scheduler: Some("ddim".into()),
                negative_prompt: Some("blurry, low quality".into()),
                ..Default::default()
            },
            sweep: vec![
                axis("prompt", vec![text("a red fox"), text("a camera")], ""),
                axis("seed", (1..=4).map(int).collect(), ""),
            ],
            items: vec![RecipeFields {
                prompt: Some("a lighthouse at dusk".into()),
                seed: Some(42),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn sweep_is_crossed_first_axis_outermost_then_items() {
        let items = expand(&issue_spec(), 0).unwrap();
        assert_eq!(items.len(), 9);
        let pairs: Vec<_> = items
            .iter()
            .map(|i| (i.recipe.prompt.as_str(), i.recipe.seed))
            .collect();
        assert_eq!(pairs[0], ("a red fox", 1));
        assert_eq!(pairs[3], ("a red fox", 4));
        assert_eq!(pairs[4], ("a camera", 1));
        assert_eq!(pairs[8], ("a lighthouse at dusk", 42));
        assert!(items.iter().all(|i| i.recipe.width == 64
            && i.recipe.negative_prompt == "blurry, low quality"
            && i.recipe.steps == 4));
        assert_eq!(
            items.iter().map(|i| i.index).collect::<Vec<_>>(),
            (0..9).collect::<Vec<_>>()
        );
    }

    #[test]
    fn zipped_axes_advance_together() {
        let mut spec = issue_spec();
        spec.items.clear();
        spec.sweep = vec![
            axis("prompt", vec![text("a"), text("b")], "pair"),
            axis("seed", vec![int(10), int(20)], "pair"),
            axis("steps", vec![int(2), int(3), int(4)], ""),
        ];
        let items = expand(&spec, 0).unwrap();
        assert_eq!(items.len(), 6);
        assert_eq!(
            (items[0].recipe.prompt.as_str(), items[0].recipe.seed),
            ("a", 10)
        );
        assert_eq!(
            (items[3].recipe.prompt.as_str(), items[3].recipe.seed),
            ("b", 20)
        );
        spec.sweep[1].values.pop();
        assert_eq!(expand(&spec, 0).unwrap_err().path, "sweep.seed");
    }

    #[test]
    fn errors_name_where_the_value_was_set() {
        let mut spec = issue_spec();
        spec.defaults.width = Some(63);
        let e = expand(&spec, 0).unwrap_err();
        assert_eq!(e.path, "defaults.width");
        assert!(e.message.contains("63"));

        let mut spec = issue_spec();
        spec.items[0].steps = Some(0);
        assert_eq!(expand(&spec, 0).unwrap_err().path, "items[0].steps");

        let mut spec = issue_spec();
        spec.sweep[1].values[2] = text("three");
        let e = expand(&spec, 0).unwrap_err();
        assert_eq!(e.path, "sweep.seed[2]");
        assert!(e.message.contains("\"three\""));

        let mut spec = issue_spec();
        spec.items[0].scheduler = Some("plms".into());
        assert_eq!(expand(&spec, 0).unwrap_err().path, "items[0].scheduler");

        let mut spec = issue_spec();
        spec.sweep.push(axis("widht", vec![int(64)], ""));
        assert_eq!(expand(&spec, 0).unwrap_err().path, "sweep.widht");

        let mut spec = issue_spec();
        spec.defaults.model = None;
        assert_eq!(expand(&spec, 0).unwrap_err().path, "sweep.model");
    }

    #[test]
    fn init_images_must_be_sent_with_the_job() {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let blob = Blob::new(png.into_inner());
        let mut spec = issue_spec();
        spec.items[0].init_image = Some(blob.sha256.clone());
        spec.items[0].strength = Some(0.4);
        assert_eq!(expand(&spec, 0).unwrap_err().path, "items[0].init_image");
        spec.blobs.push(blob.clone());
        let items = expand(&spec, 0).unwrap();
        assert_eq!(
            items[8].recipe.init_image.as_deref(),
            Some(blob.sha256.as_str())
        );
        assert_eq!(items[8].recipe.strength, 0.4);
        assert_eq!(items[0].recipe.strength, 1.0, "txt2img is strength 1");
        spec.sweep
            .push(axis("karras", vec![FieldValue::Flag(true)], ""));
        assert_eq!(
            expand(&spec, 0).unwrap_err().path,
            "sweep.karras[0]",
            "karras with ddim"
        );
    }

    #[test]
    fn malformed_prompt_weights_are_refused_naming_the_field() {
        let mut spec = issue_spec();
        spec.items[0].prompt = Some("a (red car:1.2.3) here".into());
        let e = expand(&spec, 0).unwrap_err();
        assert_eq!(e.path, "items[0].prompt");
        assert!(e.message.contains("(red car:1.2.3)"), "{e}");

        let mut spec = issue_spec();
        spec.items[0].prompt = Some("a fox AND a hen:0.5".into());
        let e = expand(&spec, 0).unwrap_err();
        assert_eq!(e.path, "items[0].prompt");
        assert!(e.message.contains("`AND`"), "{e}");

        let mut spec = issue_spec();
        spec.sweep[0].values[1] = text("a (camera:1.2.3)");
        assert_eq!(expand(&spec, 0).unwrap_err().path, "sweep.prompt[1]");

        let mut spec = issue_spec();
        spec.defaults.negative_prompt = Some("(blurry:1..2)".into());
        assert_eq!(
            expand(&spec, 0).unwrap_err().path,
            "defaults.negative_prompt"
        );

        // Valid weights, unbalanced brackets, colons in text and prompt editing
        // pass, as in the web UI.
        for prompt in [
            "a ((lighthouse:1.3)) [at dusk, (style: ink",
            "(style:anime) (a:1e3)",
            "a [dog:cat:0.5] in a [red|blue] car",
        ] {
            let mut spec = issue_spec();
            spec.items[0].prompt = Some(prompt.into());
            assert_eq!(expand(&spec, 0).unwrap().len(), 9, "{prompt}");
        }
    }

    /// The series of issue #5: an anchor and three shots, the last with its own seed.
    fn mira() -> JobSpec {
        let shot = |prompt: &str, seed: Option<u64>| RecipeFields {
            prompt: Some(prompt.into()),
            seed,
            ..Default::default()
        };
        JobSpec {
            series: vec![SeriesSpec {
                name: "mira".into(),
                character: "Mira, a young cartographer".into(),
                defaults: RecipeFields {
                    model: Some("tiny".into()),
                    negative_prompt: Some("extra fingers".into()),
                    seed: Some(777),
                    width: Some(64),
                    height: Some(64),
                    steps: Some(6),
                    ..Default::default()
                },
                anchor: true,
                consistency: Some(0.6),
                reference_image: None,
                shots: vec![
                    shot("standing on a cliff at sunrise", None),
                    shot("reading a map by candlelight", None),
                    shot("running through a rainy market street", Some(9001)),
                ],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_series_expands_to_an_anchor_and_its_shots() {
        let items = expand(&mira(), 5).unwrap();
        assert_eq!(items.len(), 4);
        let anchor = &items[0];
        assert_eq!(anchor.recipe.prompt, "Mira, a young cartographer");
        assert_eq!(anchor.recipe.seed, 777);
        assert_eq!(anchor.recipe.strength, 1.0);
        assert_eq!(anchor.file_name, "00000-mira-anchor.png");
        assert_eq!(anchor.series.as_ref().unwrap().shot, 0);
        let first = &items[1];
        assert_eq!(
            first.recipe.prompt,
            "Mira, a young cartographer, standing on a cliff at sunrise"
        );
        assert_eq!(first.recipe.seed, derive_seed(777, 1));
        assert!((first.recipe.strength - 0.4).abs() < 1e-12);
        assert_eq!(
            first.recipe.noise_seed,
            Some(777),
            "shots share the anchor's noise"
        );
        assert_eq!(
            first.recipe.init_image, None,
            "filled when the anchor is done"
        );
        assert_eq!(first.series.as_ref().unwrap().depends_on, Some(0));
        assert_eq!(
            first.file_name,
            "00001-mira-01-standing-on-a-cliff-at-sunrise.png"
        );
        assert_eq!(items[3].recipe.seed, 9001);
        assert_eq!(items[3].recipe.negative_prompt, "extra fingers");
        // Seeds are a pure function of (series seed, shot number): the base does not matter.
        assert_eq!(
            expand(&mira(), 6).unwrap()[2].recipe.seed,
            items[2].recipe.seed
        );
    }

    #[test]
    fn series_errors_name_the_series_field() {
        let mut spec = mira();
        spec.series[0].consistency = Some(1.5);
        assert_eq!(
            expand(&spec, 0).unwrap_err().path,
            "series.mira.consistency"
        );
        let mut spec = mira();
        spec.series[0].shots[1].steps = Some(0);
        assert_eq!(
            expand(&spec, 0).unwrap_err().path,
            "series.mira.shots[1].steps"
        );
        let mut spec = mira();
        spec.series[0].character.clear();
        assert_eq!(expand(&spec, 0).unwrap_err().path, "series.mira.character");
        let mut spec = mira();
        spec.series[0].name = "mi ra".into();
        assert_eq!(expand(&spec, 0).unwrap_err().path, "series.mi ra");
        let mut spec = mira();
        spec.series[0].reference_image = Some("ab".repeat(32));
        assert_eq!(
            expand(&spec, 0).unwrap_err().path,
            "series.mira.reference_image"
        );
    }

    #[test]
    fn a_series_without_anchor_renders_its_shots_from_text() {
        let mut spec = mira();
        spec.series[0].anchor = false;
        let items = expand(&spec, 0).unwrap();
        assert_eq!(items.len(), 3);
        assert!(
            items
                .iter()
                .all(|i| i.recipe.strength == 1.0 && i.recipe.noise_seed.is_none())
        );
        assert!(
            items
                .iter()
                .all(|i| i.series.as_ref().unwrap().depends_on.is_none())
        );
    }

    #[test]
    fn empty_job_is_refused() {
        let spec = JobSpec::default();
        assert_eq!(expand(&spec, 0).unwrap_err().path, "items");
    }

    #[test]
    fn missing_seeds_are_derived_from_the_base() {
        let mut spec = issue_spec();
        spec.items[0].seed = None;
        let a = expand(&spec, 99).unwrap();
        let b = expand(&spec, 99).unwrap();
        assert_eq!(a[8].recipe.seed, b[8].recipe.seed);
        assert_eq!(a[8].recipe.seed, derive_seed(99, 8));
        assert_ne!(expand(&spec, 100).unwrap()[8].recipe.seed, a[8].recipe.seed);
    }

    #[test]
    fn huge_sweeps_are_refused_before_expansion() {
        let mut spec = issue_spec();
        spec.sweep = vec![
            axis("seed", (0..1000).map(int).collect(), ""),
            axis("steps", (1..=200).map(int).collect(), ""),
        ];
        assert_eq!(expand(&spec, 0).unwrap_err().path, "sweep");
    }

    #[test]
    fn validation_checks_project_name_and_blobs_before_expanding() {
        let mut spec = issue_spec();
        spec.project = "a/b".into();
        assert_eq!(validate(&spec, 0).unwrap_err().path, "project");
        spec.project = "..".into();
        assert_eq!(validate(&spec, 0).unwrap_err().path, "project");
        spec.project = "studio-a".into();
        assert_eq!(spec.project_or_default(), "studio-a");
        assert_eq!(validate(&spec, 0).unwrap().len(), 9);

        let mut spec = issue_spec();
        spec.name = "x".repeat(MAX_LABEL_BYTES + 44);
        let e = validate(&spec, 0).unwrap_err();
        assert_eq!(e.path, "name");
        assert!(e.message.contains("300 bytes"), "{e}");
        spec.name = "a\u{0}b".into();
        assert_eq!(validate(&spec, 0).unwrap_err().path, "name");
        assert_eq!(JobSpec::default().project_or_default(), DEFAULT_PROJECT);

        let mut spec = issue_spec();
        spec.blobs.push(Blob {
            sha256: "00".repeat(32),
            data: vec![1, 2, 3],
        });
        assert_eq!(validate(&spec, 0).unwrap_err().path, "blobs[0]");
    }

    #[test]
    fn series_named_like_dot_folders_are_refused() {
        for name in [".", ".."] {
            let mut spec = mira();
            spec.series[0].name = name.into();
            let e = validate(&spec, 0).unwrap_err();
            assert_eq!(e.path, format!("series.{name}"));
        }
    }

    #[test]
    fn control_characters_in_prompts_are_refused_where_written() {
        let mut spec = issue_spec();
        spec.items[0].prompt = Some("fox\u{0}cub".into());
        assert_eq!(validate(&spec, 0).unwrap_err().path, "items[0].prompt");
        let mut spec = mira();
        spec.series[0].character = "Mira\u{7}".into();
        assert_eq!(
            validate(&spec, 0).unwrap_err().path,
            "series.mira.character"
        );
    }

    #[test]
    fn strength_is_checked_where_it_is_written() {
        // Out of range is refused even where no init image would use it.
        let mut spec = issue_spec();
        spec.defaults.strength = Some(1.5);
        let e = validate(&spec, 0).unwrap_err();
        assert_eq!(e.path, "defaults.strength");
        assert!(e.message.contains("1.5"), "{e}");
        // A shared strength in range applies to the img2img tasks only.
        spec.defaults.strength = Some(0.4);
        let items = validate(&spec, 0).unwrap();
        assert!(items.iter().all(|i| i.recipe.strength == 1.0));
        // A task's own strength without an init image would be silently ignored.
        let mut spec = issue_spec();
        spec.items[0].strength = Some(0.5);
        let e = validate(&spec, 0).unwrap_err();
        assert_eq!(e.path, "items[0].strength");
        assert!(e.message.contains("init_image"), "{e}");
        let mut spec = issue_spec();
        spec.sweep
            .push(axis("strength", vec![FieldValue::Number(0.3)], ""));
        assert_eq!(validate(&spec, 0).unwrap_err().path, "sweep.strength[0]");
    }

    #[test]
    fn integer_fields_report_the_range_the_recipe_accepts() {
        let e = integer_field("defaults.steps", "steps", -1).unwrap_err();
        assert_eq!(e.message, "must be between 1 and 500, got -1");
        let e = integer_field("w", "width", -8).unwrap_err();
        assert!(e.message.contains("between 64 and 2048"), "{e}");
        assert!(integer_field("s", "seed", -1).is_err());
        assert_eq!(integer_field("s", "seed", 7).unwrap(), 7);
        let mut spec = issue_spec();
        spec.sweep[1].values[0] = int(-3);
        assert_eq!(validate(&spec, 0).unwrap_err().path, "sweep.seed[0]");
        let mut spec = issue_spec();
        spec.sweep.push(axis("steps", vec![int(-1)], ""));
        let e = validate(&spec, 0).unwrap_err();
        assert_eq!(e.path, "sweep.steps[0]");
        assert!(e.message.contains("between 1 and 500"), "{e}");
    }

    #[test]
    fn a_model_is_found_where_a_series_names_it() {
        let mut spec = mira();
        spec.series[0].defaults.model = Some("sd15".into());
        spec.series[0].shots[1].model = Some("sdxl".into());
        assert_eq!(model_field(&spec, "sdxl"), "series.mira.shots[1].model");
        assert_eq!(model_field(&spec, "sd15"), "series.mira.model");
        assert_eq!(model_field(&spec, "other"), "defaults.model");
    }

    #[test]
    fn extras_are_found_where_they_are_written() {
        let lora = |name: &str| LoraRef {
            name: name.into(),
            hash: String::new(),
            unet_weight: 1.0,
            te_weight: 1.0,
        };
        let mut spec = issue_spec();
        spec.sweep.push(axis(
            "loras",
            vec![
                FieldValue::Loras(vec![]),
                FieldValue::Loras(vec![lora("a"), lora("b")]),
            ],
            "",
        ));
        spec.items[0].prompt = Some("<lora:c:0.5> a lighthouse".into());
        spec.defaults.loras = Some(vec![lora("d")]);
        assert_eq!(
            extra_field(&spec, ExtraKind::Lora, "b"),
            "sweep.loras[1][1].name"
        );
        assert_eq!(extra_field(&spec, ExtraKind::Lora, "c"), "items[0].prompt");
        assert_eq!(
            extra_field(&spec, ExtraKind::Lora, "d"),
            "defaults.loras[0].name"
        );
        assert_eq!(
            extra_field(&spec, ExtraKind::ControlNet, "a"),
            "controlnets"
        );
        let mut spec = mira();
        spec.series[0].shots[2].controlnets = Some(vec![ControlNetRef {
            model: "pose".into(),
            hash: String::new(),
            image: "ab".repeat(32),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            resize: crate::extras::ResizeMode::Crop,
            preprocess: None,
        }]);
        assert_eq!(
            extra_field(&spec, ExtraKind::ControlNet, "pose"),
            "series.mira.shots[2].controlnets[0].model"
        );
    }

    #[test]
    fn webhook_urls_are_checked_with_the_job() {
        let mut spec = issue_spec();
        spec.notify = vec!["https://studio.example/hooks/kiln".into()];
        assert!(validate(&spec, 0).is_ok());
        spec.notify.push("ftp://studio.example".into());
        let e = validate(&spec, 0).unwrap_err();
        assert_eq!(e.path, "notify[1]");
        assert!(e.message.contains("http:// or https://"), "{e}");
    }
}
