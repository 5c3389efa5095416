//! Conversions between kiln's domain types (`kiln-domain`) and the wire
//! messages: the one place a recipe or a job spec meets `pb`.

use kiln_domain::error::FieldError;
use kiln_domain::extras::{
    ControlNetRef, EmbeddingRef, Extras, Hires, LoraRef, Preprocessor, ResizeMode, Upscaler,
};
use kiln_domain::lora_set::{MAX_READY_SETS, ReadyLoraSet};
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
        loras: r.extras.loras.iter().map(lora_to_pb).collect(),
        embeddings: r
            .extras
            .embeddings
            .iter()
            .map(|e| pb::Embedding {
                name: e.name.clone(),
                hash: e.hash.clone(),
            })
            .collect(),
        controlnets: r.extras.controlnets.iter().map(controlnet_to_pb).collect(),
        hires: r.extras.hires.as_ref().map(hires_to_pb),
    }
}

/// Reads and validates a wire recipe; `path` prefixes the field names in errors.
///
/// # Errors
/// A [`FieldError`] naming the first field that is unknown or out of range.
pub fn recipe_from_pb(r: &pb::Recipe, path: &str) -> Result<Recipe, FieldError> {
    let scheduler_path = at(path, "scheduler");
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
        extras: Extras {
            loras: r.loras.iter().map(lora_from_pb).collect(),
            embeddings: r
                .embeddings
                .iter()
                .map(|e| EmbeddingRef {
                    name: e.name.clone(),
                    hash: e.hash.clone(),
                })
                .collect(),
            controlnets: controlnets_from_pb(&r.controlnets, &at(path, "controlnets"))?,
            hires: r
                .hires
                .as_ref()
                .map(|h| hires_from_pb(h, &at(path, "hires")))
                .transpose()?,
        },
    };
    recipe.validate(path)?;
    Ok(recipe)
}

/// Returns `path.field`, or `field` at the top.
fn at(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// Returns a worker's ready LoRA sets as the wire messages of a `LeaseRequest`.
pub fn ready_sets_to_pb(sets: &[ReadyLoraSet]) -> Vec<pb::ReadyLoraSet> {
    sets.iter()
        .map(|r| pb::ReadyLoraSet {
            model: r.model.clone(),
            set: r.set.clone(),
        })
        .collect()
}

/// Returns the ready LoRA sets a `LeaseRequest` reports, at most
/// [`MAX_READY_SETS`] (the rest are left out: they are a scheduling hint, not
/// a promise, so an over-long report costs the worker only some preference).
pub fn ready_sets_from_pb(sets: &[pb::ReadyLoraSet]) -> Vec<ReadyLoraSet> {
    sets.iter()
        .take(MAX_READY_SETS)
        .map(|r| ReadyLoraSet {
            model: r.model.clone(),
            set: r.set.clone(),
        })
        .collect()
}

fn lora_to_pb(l: &LoraRef) -> pb::Lora {
    pb::Lora {
        name: l.name.clone(),
        hash: l.hash.clone(),
        unet_weight: l.unet_weight,
        te_weight: l.te_weight,
    }
}

fn lora_from_pb(l: &pb::Lora) -> LoraRef {
    LoraRef {
        name: l.name.clone(),
        hash: l.hash.clone(),
        unet_weight: l.unet_weight,
        te_weight: l.te_weight,
    }
}

fn controlnet_to_pb(c: &ControlNetRef) -> pb::ControlNet {
    pb::ControlNet {
        model: c.model.clone(),
        hash: c.hash.clone(),
        image: c.image.clone(),
        scale: c.scale,
        start: c.start,
        end: c.end,
        resize: c.resize.name().to_string(),
        preprocess: c
            .preprocess
            .map(|p| p.name().to_string())
            .unwrap_or_default(),
    }
}

/// Reads wire ControlNets; `path` names the list in errors (`path[i].resize`).
fn controlnets_from_pb(
    list: &[pb::ControlNet],
    path: &str,
) -> Result<Vec<ControlNetRef>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(ControlNetRef {
                model: c.model.clone(),
                hash: c.hash.clone(),
                image: c.image.clone(),
                scale: c.scale,
                start: c.start,
                end: c.end,
                resize: ResizeMode::parse(&format!("{path}[{i}].resize"), &c.resize)?,
                preprocess: (!c.preprocess.is_empty())
                    .then(|| Preprocessor::parse(&format!("{path}[{i}].preprocess"), &c.preprocess))
                    .transpose()?,
            })
        })
        .collect()
}

fn hires_to_pb(h: &Hires) -> pb::Hires {
    pb::Hires {
        scale: h.scale,
        steps: h.steps,
        denoise: h.denoise,
        upscaler: h.upscaler.name().to_string(),
    }
}

fn hires_from_pb(h: &pb::Hires, path: &str) -> Result<Hires, FieldError> {
    Ok(Hires {
        scale: h.scale,
        steps: h.steps,
        denoise: h.denoise,
        upscaler: Upscaler::parse(&at(path, "upscaler"), &h.upscaler)?,
    })
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
/// A sweep value with no value set, as `sweep.FIELD[i]`; a ControlNet resize
/// mode, preprocessor or hires upscaler kiln does not know, named by its field.
pub fn job_spec_from_pb(spec: pb::JobSpec) -> Result<JobSpec, FieldError> {
    let mut sweep = Vec::with_capacity(spec.sweep.len());
    for axis in spec.sweep {
        let mut values = Vec::with_capacity(axis.values.len());
        for (i, v) in axis.values.into_iter().enumerate() {
            let path = format!("sweep.{}[{i}]", kiln_domain::error::segment(&axis.field));
            let value =
                value_from_pb(v, &path)?.ok_or_else(|| FieldError::new(path, "has no value"))?;
            values.push(value);
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
        defaults: spec
            .defaults
            .map(|f| fields_from_pb(f, "defaults"))
            .transpose()?
            .unwrap_or_default(),
        sweep,
        items: spec
            .items
            .into_iter()
            .enumerate()
            .map(|(i, f)| fields_from_pb(f, &format!("items[{i}]")))
            .collect::<Result<_, _>>()?,
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
            .map(|s| {
                let path = format!("series.{}", kiln_domain::error::segment(&s.name));
                Ok(SeriesSpec {
                    defaults: s
                        .defaults
                        .map(|f| fields_from_pb(f, &path))
                        .transpose()?
                        .unwrap_or_default(),
                    shots: s
                        .shots
                        .into_iter()
                        .enumerate()
                        .map(|(i, f)| fields_from_pb(f, &format!("{path}.shots[{i}]")))
                        .collect::<Result<_, FieldError>>()?,
                    name: s.name,
                    character: s.character,
                    anchor: s.anchor,
                    consistency: s.consistency,
                    reference_image: (!s.reference_image.is_empty()).then_some(s.reference_image),
                })
            })
            .collect::<Result<_, FieldError>>()?,
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
        loras: f.loras.as_ref().map(|l| pb::Loras {
            items: l.iter().map(lora_to_pb).collect(),
        }),
        controlnets: f.controlnets.as_ref().map(|c| pb::ControlNets {
            items: c.iter().map(controlnet_to_pb).collect(),
        }),
        hires: f.hires.as_ref().map(hires_to_pb),
    }
}

/// Reads wire recipe fields; `path` names them in errors.
fn fields_from_pb(f: pb::RecipeFields, path: &str) -> Result<RecipeFields, FieldError> {
    Ok(RecipeFields {
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
        loras: f.loras.map(|l| l.items.iter().map(lora_from_pb).collect()),
        controlnets: f
            .controlnets
            .map(|c| controlnets_from_pb(&c.items, &format!("{path}.controlnets")))
            .transpose()?,
        hires: f
            .hires
            .map(|h| hires_from_pb(&h, &format!("{path}.hires")))
            .transpose()?,
    })
}

fn value_to_pb(v: &FieldValue) -> pb::FieldValue {
    use pb::field_value::Kind;
    pb::FieldValue {
        kind: Some(match v {
            FieldValue::Text(s) => Kind::Text(s.clone()),
            FieldValue::Integer(i) => Kind::Integer(*i),
            FieldValue::Number(n) => Kind::Number(*n),
            FieldValue::Flag(b) => Kind::Flag(*b),
            FieldValue::Loras(l) => Kind::Loras(pb::Loras {
                items: l.iter().map(lora_to_pb).collect(),
            }),
            FieldValue::ControlNets(c) => Kind::Controlnets(pb::ControlNets {
                items: c.iter().map(controlnet_to_pb).collect(),
            }),
            FieldValue::Hires(h) => Kind::Hires(hires_to_pb(h)),
        }),
    }
}

/// Reads a sweep value; `None` when the wire value has none set.
fn value_from_pb(v: pb::FieldValue, path: &str) -> Result<Option<FieldValue>, FieldError> {
    use pb::field_value::Kind;
    let Some(kind) = v.kind else {
        return Ok(None);
    };
    Ok(Some(match kind {
        Kind::Text(s) => FieldValue::Text(s),
        Kind::Integer(i) => FieldValue::Integer(i),
        Kind::Number(n) => FieldValue::Number(n),
        Kind::Flag(b) => FieldValue::Flag(b),
        Kind::Loras(l) => FieldValue::Loras(l.items.iter().map(lora_from_pb).collect()),
        Kind::Controlnets(c) => FieldValue::ControlNets(controlnets_from_pb(&c.items, path)?),
        Kind::Hires(h) => FieldValue::Hires(hires_from_pb(&h, path)?),
    }))
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
                    FieldValue::Loras(vec![]),
                    FieldValue::Loras(vec![lora()]),
                    FieldValue::ControlNets(vec![controlnet()]),
                    FieldValue::Hires(hires()),
                ],
                zip: "pair".into(),
            }],
            items: vec![RecipeFields {
                prompt: Some("a fox".into()),
                strength: Some(0.4),
                loras: Some(vec![]),
                controlnets: Some(vec![controlnet()]),
                hires: Some(hires()),
                ..Default::default()
            }],
            blobs: vec![Blob::new(vec![1, 2, 3])],
            series: vec![
                SeriesSpec {
                    name: "mira".into(),
                    character: "Mira".into(),
                    anchor: true,
                    consistency: Some(0.6),
                    shots: vec![
                        RecipeFields::default(),
                        RecipeFields {
                            loras: Some(vec![lora()]),
                            controlnets: Some(vec![controlnet()]),
                            ..Default::default()
                        },
                    ],
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
        let mut wire = job_spec_to_pb(&spec);
        wire.series[0].shots[1].controlnets.as_mut().unwrap().items[0].resize = "zoom".into();
        assert_eq!(
            job_spec_from_pb(wire).unwrap_err().path,
            "series.mira.shots[1].controlnets[0].resize"
        );
        let mut wire = job_spec_to_pb(&spec);
        wire.items[0].hires.as_mut().unwrap().upscaler = "esrgan".into();
        assert_eq!(
            job_spec_from_pb(wire).unwrap_err().path,
            "items[0].hires.upscaler"
        );
    }

    fn lora() -> LoraRef {
        LoraRef {
            name: "mira-v3".into(),
            hash: "cd".repeat(32),
            unet_weight: 0.8,
            te_weight: 0.5,
        }
    }

    fn controlnet() -> ControlNetRef {
        ControlNetRef {
            model: "pose".into(),
            hash: String::new(),
            image: "ef".repeat(32),
            scale: 0.9,
            start: 0.1,
            end: 0.8,
            resize: ResizeMode::Stretch,
            preprocess: Some(Preprocessor::Scribble),
        }
    }

    fn hires() -> Hires {
        Hires {
            scale: 2.0,
            steps: 10,
            denoise: 0.5,
            upscaler: Upscaler::Lanczos,
        }
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
            extras: Extras {
                loras: vec![lora()],
                embeddings: vec![EmbeddingRef {
                    name: "badhands".into(),
                    hash: "12".repeat(32),
                }],
                controlnets: vec![controlnet()],
                hires: Some(hires()),
            },
        };
        assert_eq!(recipe_from_pb(&recipe_to_pb(&r), "").unwrap(), r);
        let plain = Recipe {
            extras: Extras::default(),
            ..r
        };
        assert_eq!(recipe_from_pb(&recipe_to_pb(&plain), "").unwrap(), plain);
    }
}
