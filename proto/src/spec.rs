//! Expansion of a job spec (defaults, sweep, items) into validated recipes.

use crate::error::FieldError;
use crate::pb::{self, FieldValue, RecipeFields, field_value::Kind};
use crate::recipe::{Recipe, Scheduler, derive_seed};

/// Most tasks one job may expand to.
pub const MAX_TASKS_PER_JOB: usize = 100_000;

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

/// One task of an expanded job.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpandedItem {
    /// Position in the job: sweep tasks first, then items.
    pub index: u32,
    /// The complete recipe.
    pub recipe: Recipe,
}

/// Expands `spec` into its tasks, validating every field.
///
/// Items without a seed get `derive_seed(seed_base, index)`, so the chosen seed
/// is a pure function of the job's base and the item's position.
///
/// # Errors
/// The first invalid field, named by where the user set it (`sweep.seed[2]`,
/// `items[0].width`, `defaults.steps`).
pub fn expand(spec: &pb::JobSpec, seed_base: u64) -> Result<Vec<ExpandedItem>, FieldError> {
    crate::blob::check_blobs(&spec.blobs)?;
    let defaults = spec.defaults.clone().unwrap_or_default();
    let combos = sweep_combinations(&spec.sweep)?;
    let total = combos.len() + spec.items.len();
    if total == 0 {
        return Err(FieldError::new(
            "items",
            "the job has no items: add a [sweep] or [[items]]",
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
        let mut layer = Layered::new(&defaults);
        for (axis, value_index) in combo {
            let axis = &spec.sweep[axis];
            let path = format!("sweep.{}[{value_index}]", axis.field);
            set_field(
                &mut layer.fields,
                &axis.field,
                &axis.values[value_index],
                &path,
            )?;
            layer.set_origin(&axis.field, path);
        }
        let index = out.len() as u32;
        out.push(ExpandedItem {
            index,
            recipe: layer.finish(seed_base, index, "sweep", &spec.blobs)?,
        });
    }
    for (i, item) in spec.items.iter().enumerate() {
        let mut layer = Layered::new(&defaults);
        layer.overlay(item, &format!("items[{i}]"));
        let index = out.len() as u32;
        out.push(ExpandedItem {
            index,
            recipe: layer.finish(seed_base, index, &format!("items[{i}]"), &spec.blobs)?,
        });
    }
    Ok(out)
}

/// Returns where in `spec` the model `name` is written (`sweep.model[1]`,
/// `items[0].model` or `defaults.model`), for errors about that model.
pub fn model_field(spec: &pb::JobSpec, name: &str) -> String {
    for axis in spec.sweep.iter().filter(|a| a.field == "model") {
        if let Some(i) = axis
            .values
            .iter()
            .position(|v| matches!(&v.kind, Some(Kind::Text(t)) if t == name))
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
    "defaults.model".to_string()
}

/// Returns every combination of the sweep as (axis index, value index) pairs:
/// zipped axes advance together, groups are crossed with the first outermost.
fn sweep_combinations(axes: &[pb::SweepAxis]) -> Result<Vec<Vec<(usize, usize)>>, FieldError> {
    if axes.is_empty() {
        return Ok(Vec::new());
    }
    // Groups of axis indices, in order of first appearance.
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, axis) in axes.iter().enumerate() {
        let path = format!("sweep.{}", axis.field);
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
            "unknown recipe field {field:?}; expected one of {}",
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
    let kind = value
        .kind
        .as_ref()
        .ok_or_else(|| FieldError::new(path, "has no value"))?;
    let text = || match kind {
        Kind::Text(s) => Ok(s.clone()),
        other => Err(FieldError::new(
            path,
            format!("expected text, got {}", describe(other)),
        )),
    };
    let integer = |max: u64| match kind {
        Kind::Integer(i) if *i >= 0 && (*i as u64) <= max => Ok(*i as u64),
        Kind::Integer(i) => Err(FieldError::new(
            path,
            format!("must be between 0 and {max}, got {i}"),
        )),
        other => Err(FieldError::new(
            path,
            format!("expected an integer, got {}", describe(other)),
        )),
    };
    let number = || match kind {
        Kind::Number(n) => Ok(*n),
        Kind::Integer(i) => Ok(*i as f64),
        other => Err(FieldError::new(
            path,
            format!("expected a number, got {}", describe(other)),
        )),
    };
    match name {
        "model" => fields.model = Some(text()?),
        "prompt" => fields.prompt = Some(text()?),
        "negative_prompt" => fields.negative_prompt = Some(text()?),
        "scheduler" => fields.scheduler = Some(text()?),
        "init_image" => fields.init_image = Some(text()?),
        "mask" => fields.mask = Some(text()?),
        "karras" => {
            fields.karras = Some(match kind {
                Kind::Flag(b) => *b,
                other => {
                    return Err(FieldError::new(
                        path,
                        format!("expected true or false, got {}", describe(other)),
                    ));
                }
            })
        }
        "seed" => fields.seed = Some(integer(i64::MAX as u64)?),
        "steps" => fields.steps = Some(integer(u32::MAX as u64)? as u32),
        "width" => fields.width = Some(integer(u32::MAX as u64)? as u32),
        "height" => fields.height = Some(integer(u32::MAX as u64)? as u32),
        "guidance" => fields.guidance = Some(number()?),
        "eta" => fields.eta = Some(number()?),
        "strength" => fields.strength = Some(number()?),
        other => return Err(unknown_field(path, other)),
    }
    Ok(())
}

fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Text(s) => format!("text {s:?}"),
        Kind::Integer(i) => format!("integer {i}"),
        Kind::Number(n) => format!("number {n}"),
        Kind::Flag(b) => format!("boolean {b}"),
    }
}

/// A recipe under construction that remembers where each field was set.
struct Layered {
    fields: RecipeFields,
    /// Path of the value of each field in `FIELDS` order; None = built-in default.
    origins: [Option<String>; FIELDS.len()],
}

impl Layered {
    fn new(defaults: &RecipeFields) -> Self {
        let mut layer = Self {
            fields: RecipeFields::default(),
            origins: Default::default(),
        };
        layer.overlay(defaults, "defaults");
        layer
    }

    fn set_origin(&mut self, field: &str, path: String) {
        if let Some(i) = FIELDS.iter().position(|f| *f == field) {
            self.origins[i] = Some(path);
        }
    }

    /// Puts the fields `top` sets over the current ones.
    fn overlay(&mut self, top: &RecipeFields, prefix: &str) {
        macro_rules! take {
            ($($f:ident),*) => {$(
                if let Some(v) = &top.$f {
                    self.fields.$f = Some(v.clone());
                    self.set_origin(stringify!($f), format!("{prefix}.{}", stringify!($f)));
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
            mask
        );
    }

    fn origin(&self, field: &str, fallback: &str) -> String {
        FIELDS
            .iter()
            .position(|f| *f == field)
            .and_then(|i| self.origins[i].clone())
            .unwrap_or_else(|| format!("{fallback}.{field}"))
    }

    fn finish(
        self,
        seed_base: u64,
        index: u32,
        fallback: &str,
        blobs: &[pb::Blob],
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
        let recipe = Recipe {
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
            strength: if f.init_image.is_some() {
                f.strength.unwrap_or(builtin::STRENGTH)
            } else {
                1.0
            },
            init_image: f.init_image.clone(),
            mask: f.mask.clone(),
        };
        for (field, value) in [("init_image", &recipe.init_image), ("mask", &recipe.mask)] {
            if let Some(sha) = value
                && !blobs.iter().any(|b| &b.sha256 == sha)
            {
                return Err(FieldError::new(
                    self.origin(field, fallback),
                    format!("no image with sha256 {sha} was sent with the job"),
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
            .map_err(|e| FieldError::new(self.origin(&e.path, fallback), e.message))?;
        // A malformed weight is refused here, not found by a worker mid-job.
        crate::prompt::parse_field(&self.origin("prompt", fallback), &recipe.prompt)?;
        crate::prompt::parse_field(
            &self.origin("negative_prompt", fallback),
            &recipe.negative_prompt,
        )?;
        Ok(recipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> FieldValue {
        FieldValue {
            kind: Some(Kind::Text(s.into())),
        }
    }
    fn int(i: i64) -> FieldValue {
        FieldValue {
            kind: Some(Kind::Integer(i)),
        }
    }
    fn axis(field: &str, values: Vec<FieldValue>, zip: &str) -> pb::SweepAxis {
        pb::SweepAxis {
            field: field.into(),
            values,
            zip: zip.into(),
        }
    }

    /// The batch file of issue #2: 2 prompts x 4 seeds, plus one item.
    fn issue_spec() -> pb::JobSpec {
        pb::JobSpec {
            defaults: Some(RecipeFields {
                model: Some("tiny".into()),
                width: Some(64),
                height: Some(64),
                steps: Some(4),
                guidance: Some(5.0),
                scheduler: Some("ddim".into()),
                negative_prompt: Some("blurry, low quality".into()),
                ..Default::default()
            }),
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
        spec.defaults.as_mut().unwrap().width = Some(63);
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
        spec.defaults.as_mut().unwrap().model = None;
        assert_eq!(expand(&spec, 0).unwrap_err().path, "sweep.model");
    }

    #[test]
    fn init_images_must_be_sent_with_the_job() {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9]));
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let blob = crate::blob::blob(png.into_inner());
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
        spec.sweep.push(axis(
            "karras",
            vec![FieldValue {
                kind: Some(Kind::Flag(true)),
            }],
            "",
        ));
        assert_eq!(
            expand(&spec, 0).unwrap_err().path,
            "sweep.karras[0]",
            "karras with ddim"
        );
    }

    #[test]
    fn malformed_prompt_weights_are_refused_naming_the_field() {
        let mut spec = issue_spec();
        spec.items[0].prompt = Some("a (red car:abc) here".into());
        let e = expand(&spec, 0).unwrap_err();
        assert_eq!(e.path, "items[0].prompt");
        assert!(e.message.contains("(red car:abc)"), "{e}");

        let mut spec = issue_spec();
        spec.sweep[0].values[1] = text("a (camera:1.2.3)");
        assert_eq!(expand(&spec, 0).unwrap_err().path, "sweep.prompt[1]");

        let mut spec = issue_spec();
        spec.defaults.as_mut().unwrap().negative_prompt = Some("(blurry:lots)".into());
        assert_eq!(
            expand(&spec, 0).unwrap_err().path,
            "defaults.negative_prompt"
        );

        // Valid weights, unbalanced brackets and colons in text pass, as in the web UI.
        let mut spec = issue_spec();
        spec.items[0].prompt = Some("a ((lighthouse:1.3)) [at dusk, (style: ink".into());
        assert_eq!(expand(&spec, 0).unwrap().len(), 9);
    }

    #[test]
    fn empty_job_is_refused() {
        let spec = pb::JobSpec::default();
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
}
