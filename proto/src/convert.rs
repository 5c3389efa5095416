//! Conversions between kiln's domain types (`kiln-domain`) and the wire
//! messages: the one place a recipe meets `pb`.

use kiln_domain::error::FieldError;
use kiln_domain::recipe::{Recipe, Scheduler};

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
    };
    recipe.validate(path)?;
    Ok(recipe)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        assert_eq!(recipe_from_pb(&recipe_to_pb(&r), "").unwrap(), r);
    }
}
