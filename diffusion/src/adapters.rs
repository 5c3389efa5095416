//! A recipe's LoRAs and embeddings resolved against the pipeline's assets: the
//! UNet and text encoders it renders with, and what its prompts may name.
//!
//! Each `recipe.extras.loras` entry must name a LoRA of [`Pipeline::assets`] and,
//! when the recipe carries a hash (admission resolves it), the file must have
//! that hash; likewise each `recipe.extras.embeddings` entry. A LoRA at weight 0
//! for a component leaves that component alone, so weight 0 everywhere renders
//! the base model's bytes.

use std::sync::Arc;

use kiln_domain::error::quote;
use kiln_domain::recipe::Recipe;

use super::Pipeline;
use super::assets::AssetFile;
use super::error::PipelineError;
use super::lora::variants::LoraSet;
use super::text_extras::TextExtras;
use super::unet::Unet;

/// What a recipe renders with beyond the base model.
pub(crate) struct Applied {
    /// The UNet LoRA set's key: tasks with different keys never share a UNet batch.
    pub(crate) unet_key: String,
    /// The UNet: the base one, or a merged variant.
    pub(crate) unet: Arc<Unet>,
    /// Text-encoder LoRAs and embeddings.
    pub(crate) text: TextExtras,
}

/// Returns the file of asset `name` of `kind` (`loras` or `embeddings`), checking the
/// recipe's hash when it has one.
fn find<'a>(
    files: &'a std::collections::BTreeMap<String, AssetFile>,
    field: &'static str,
    what: &str,
    name: &str,
    hash: &str,
) -> Result<&'a AssetFile, PipelineError> {
    let file = files
        .get(name)
        .ok_or_else(|| PipelineError::InvalidRecipe {
            field,
            message: format!("{what} {} is not on this worker", quote(name)),
        })?;
    if !hash.is_empty() && hash != file.hash {
        return Err(PipelineError::InvalidRecipe {
            field,
            message: format!(
                "{what} {} here has hash {}, the recipe names {}",
                quote(name),
                &file.hash[..file.hash.len().min(12)],
                quote(hash)
            ),
        });
    }
    Ok(file)
}

/// Returns the LoRA sets of a recipe: the UNet's and the text encoders'.
///
/// # Errors
///
/// `InvalidRecipe` on `loras` for a name this pipeline's assets lack or whose file
/// has another hash.
pub(crate) fn lora_sets(
    p: &Pipeline,
    recipe: &Recipe,
) -> Result<(LoraSet, LoraSet), PipelineError> {
    let mut unet_set = LoraSet::default();
    let mut text_set = LoraSet::default();
    for lora in &recipe.extras.loras {
        let file = find(&p.assets.loras, "loras", "LoRA", &lora.name, &lora.hash)?;
        if lora.unet_weight != 0.0 {
            unet_set.entries.push((file.clone(), lora.unet_weight));
        }
        if lora.te_weight != 0.0 {
            text_set.entries.push((file.clone(), lora.te_weight));
        }
    }
    Ok((unet_set, text_set))
}

/// Resolves a recipe's LoRAs and embeddings, merging (or reusing) the variants it needs.
///
/// # Errors
///
/// `InvalidRecipe` on `loras` or `embeddings` for a name this pipeline's assets
/// lack or whose file has another hash; `Weights` when a file does not fit the
/// model (naming the tensor); `Candle` when merging fails.
pub(crate) fn apply(p: &Pipeline, recipe: &Recipe) -> Result<Applied, PipelineError> {
    let extras = &recipe.extras;
    let (unet_set, text_set) = lora_sets(p, recipe)?;
    let (unet_key, unet) = match p.variants.unet(&unet_set)? {
        Some(merged) => (unet_set.key(), merged),
        None => (String::new(), Arc::clone(&p.unet)),
    };
    let mut models = Vec::new();
    if !text_set.is_empty() {
        for index in 0..p.variants.targets().text.len() {
            models.push(p.variants.text(index, &text_set)?);
        }
    }
    p.variants.applied(&unet_set, &text_set);
    let mut embeddings = Vec::with_capacity(extras.embeddings.len());
    for e in &extras.embeddings {
        let file = find(
            &p.assets.embeddings,
            "embeddings",
            "embedding",
            &e.name,
            &e.hash,
        )?;
        embeddings.push((e.name.clone(), p.text.embedding(file)?));
    }
    Ok(Applied {
        unet_key,
        unet,
        text: TextExtras {
            variant: if models.iter().any(Option::is_some) {
                text_set.key()
            } else {
                String::new()
            },
            models,
            embeddings,
        },
    })
}
