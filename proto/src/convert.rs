//! Conversions between kiln's domain types (`kiln-domain`) and the wire
//! messages: the one place a recipe or a job spec meets `pb`.

use kiln_domain::error::FieldError;
use kiln_domain::recipe::{Recipe, Scheduler};
use kiln_domain::spec::{Blob, FieldValue, JobSpec, RecipeFields, SeriesSpec, SweepAxis};

use crate::pb;

/// Returns the recipe as the wire message.
pub fn recipe_to_pb(r: &Recipe) -> pb::Recipe {
    pb::Recipe {
        model: r.model.clone(),
        model_hash: r.model_hash.clone(),
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone(),
        seed: r.seed,
        steps: r.steps,
        guidance: r.guidance,
        width: r.width,
        height: r.height,
        scheduler: r.scheduler.name().to_string(),
        karras: r.karras,
        eta: r.eta,
        strength: r.strength,
        init_image: r.init_image.clone().unwrap_or_default(),
        mask: r.mask.clone().unwrap_or_default(),
        noise_seed: r.noise_seed,
    }
}

/// Reads and validates a wire recipe; `path` prefixes the field names in errors.
///
/// # Errors
/// A [`FieldError`] naming the first field that is unknown or out of range.
pub fn recipe_from_pb(r: &pb::Recipe, path: &str) -> Result<Recipe, FieldError> {
    let scheduler_path = if path.is_empty() {
        "scheduler".to_string()
    } else {
        format!("{path}.scheduler")
    };
    let recipe = Recipe {
        model: r.model.clone(),
        model_hash: r.model_hash.clone(),
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone(),
        seed: r.seed,
        steps: r.steps,
        guidance: r.guidance,
        width: r.width,
        height: r.height,
        scheduler: Scheduler::parse(&scheduler_path, &r.scheduler)?,
        karras: r.karras,
        eta: r.eta,
        strength: r.strength,
        init_image: (!r.init_image.is_empty()).then(|| r.init_image.clone()),
        mask: (!r.mask.is_empty()).then(|| r.mask.clone()),
        noise_seed: r.noise_seed,
        extras: Default::default(),
    };
    recipe.validate(path)?;
    Ok(recipe)
}

/// Returns the job spec as the wire message.
pub fn job_spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    pb::JobSpec {
        name: spec.name.clone(),
        project: spec.project.clone(),
        priority: spec.priority,
        defaults: Some(fields_to_pb(&spec.defaults)),
        sweep: spec
            .sweep
            .iter()
            .map(|a| pb::SweepAxis {
                field: a.field.clone(),
                values: a.values.iter().map(value_to_pb).collect(),
                zip: a.zip.clone(),
            })
            .collect(),
        items: spec.items.iter().map(fields_to_pb).collect(),
        blobs: spec
            .blobs
            .iter()
            .map(|b| pb::Blob {
                sha256: b.sha256.clone(),
                data: b.data.clone(),
            })
            .collect(),
        series: spec
            .series
            .iter()
            .map(|s| pb::SeriesSpec {
                name: s.name.clone(),
                character: s.character.clone(),
                defaults: Some(fields_to_pb(&s.defaults)),
                anchor: s.anchor,
                consistency: s.consistency,
                reference_image: s.reference_image.clone().unwrap_or_default(),
                shots: s.shots.iter().map(fields_to_pb).collect(),
            })
            .collect(),
        notify: spec.notify.clone(),
    }
}

/// Reads a wire job spec; it takes the message by value so that the blobs'
/// bytes move instead of being copied. Only the shape is checked here: the
/// rules are [`kiln_domain::spec::validate`]'s.
///
/// # Errors
/// A sweep value with no value set, as `sweep.FIELD[i]`.
pub fn job_spec_from_pb(spec: pb::JobSpec) -> Result<JobSpec, FieldError> {
    let mut sweep = Vec::with_capacity(spec.sweep.len());
    for axis in spec.sweep {
        let mut values = Vec::with_capacity(axis.values.len());
        for (i, v) in axis.values.into_iter().enumerate() {
            values.push(value_from_pb(v).ok_or_else(|| {
                FieldError::new(
                    format!("sweep.{}[{i}]", kiln_domain::error::segment(&axis.field)),
                    "has no value",
                )
            })?);
        }
        sweep.push(SweepAxis {
            field: axis.field,
            values,
            zip: axis.zip,
        });
    }
    Ok(JobSpec {
        name: spec.name,
        project: spec.project,
        priority: spec.priority,
        defaults: spec.defaults.map(fields_from_pb).unwrap_or_default(),
        sweep,
        items: spec.items.into_iter().map(fields_from_pb).collect(),
        blobs: spec
            .blobs
            .into_iter()
            .map(|b| Blob {
                sha256: b.sha256,
                data: b.data,
            })
            .collect(),
        series: spec
            .series
            .into_iter()
            .map(|s| SeriesSpec {
                name: s.name,
                character: s.character,
                defaults: s.defaults.map(fields_from_pb).unwrap_or_default(),
                anchor: s.anchor,
                consistency: s.consistency,
                reference_image: (!s.reference_image.is_empty()).then_some(s.reference_image),
                shots: s.shots.into_iter().map(fields_from_pb).collect(),
            })
            .collect(),
        notify: spec.notify,
    })
}

fn fields_to_pb(f: &RecipeFields) -> pb::RecipeFields {
    pb::RecipeFields {
        model: f.model.clone(),
        prompt: f.prompt.clone(),
        negative_prompt: f.negative_prompt.clone(),
        seed: f.seed,
        steps: f.steps,
        guidance: f.guidance,
        width: f.width,
        height: f.height,
        scheduler: f.scheduler.clone(),
        karras: f.karras,
        eta: f.eta,
        strength: f.strength,
        init_image: f.init_image.clone(),
        mask: f.mask.clone(),
    }
}

fn fields_from_pb(f: pb::RecipeFields) -> RecipeFields {
    RecipeFields {
        model: f.model,
        prompt: f.prompt,
        negative_prompt: f.negative_prompt,
        seed: f.seed,
        steps: f.steps,
        guidance: f.guidance,
        width: f.width,
        height: f.height,
        scheduler: f.scheduler,
        karras: f.karras,
        eta: f.eta,
        strength: f.strength,
        init_image: f.init_image,
        mask: f.mask,
    }
}

fn value_to_pb(v: &FieldValue) -> pb::FieldValue {
    use pb::field_value::Kind;
    pb::FieldValue {
        kind: Some(match v {
            FieldValue::Text(s) => Kind::Text(s.clone()),
            FieldValue::Integer(i) => Kind::Integer(*i),
            FieldValue::Number(n) => Kind::Number(*n),
            FieldValue::Flag(b) => Kind::Flag(*b),
        }),
    }
}

fn value_from_pb(v: pb::FieldValue) -> Option<FieldValue> {
    use pb::field_value::Kind;
    Some(match v.kind? {
        Kind::Text(s) => FieldValue::Text(s),
        Kind::Integer(i) => FieldValue::Integer(i),
        Kind::Number(n) => FieldValue::Number(n),
        Kind::Flag(b) => FieldValue::Flag(b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_spec_round_trip() {
        let spec = JobSpec {
            name: "assets".into(),
            project: "studio-a".into(),
            priority: 3,
            notify: vec!["https://studio.example/hooks/kiln".into()],
            defaults: RecipeFields {
                model: Some("tiny".into()),
                steps: Some(4),
                ..Default::default()
            },
            sweep: vec![SweepAxis {
                field: "seed".into(),
                values: vec![
                    FieldValue::Integer(1),
                    FieldValue::Text("a".into()),
                    FieldValue::Number(0.5),
                    FieldValue::Flag(true),
                ],
                zip: "pair".into(),
            }],
            items: vec![RecipeFields {
                prompt: Some("a fox".into()),
                strength: Some(0.4),
                ..Default::default()
            }],
            blobs: vec![Blob::new(vec![1, 2, 3])],
            series: vec![
                SeriesSpec {
                    name: "mira".into(),
                    character: "Mira".into(),
                    anchor: true,
                    consistency: Some(0.6),
                    shots: vec![RecipeFields::default()],
                    ..Default::default()
                },
                SeriesSpec {
                    name: "ref".into(),
                    reference_image: Some("ab".repeat(32)),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(job_spec_from_pb(job_spec_to_pb(&spec)).unwrap(), spec);
        let mut wire = job_spec_to_pb(&spec);
        wire.sweep[0].values[2].kind = None;
        assert_eq!(job_spec_from_pb(wire).unwrap_err().path, "sweep.seed[2]");
    }

    #[test]
    fn recipe_round_trip() {
        let r = Recipe {
            model: "tiny".into(),
            model_hash: "ab".repeat(32),
            prompt: "a fox".into(),
            negative_prompt: "blurry".into(),
            seed: 7,
            steps: 4,
            guidance: 5.0,
            width: 64,
            height: 96,
            scheduler: Scheduler::EulerA,
            karras: true,
            eta: 0.0,
            strength: 1.0,
            init_image: None,
            mask: None,
            noise_seed: Some(9),
            extras: Default::default(),
        };
        assert_eq!(recipe_from_pb(&recipe_to_pb(&r), "").unwrap(), r);
    }
}
