//! The key of a recipe's LoRA set: what a worker's merged UNet and text
//! encoders are cached under, what a worker reports it holds ready, and what
//! the coordinator's scheduler prefers to send it.
//!
//! A LoRA set merges into each component separately: the UNet takes each
//! LoRA at its `unet_weight`, the text encoders at its `te_weight`, in recipe
//! order (the deltas are summed in that order), and a LoRA at weight 0 leaves
//! that component alone. So a component's key ([`merge_key`]) is the list of
//! its (content hash, exact weight bits) pairs, and a set's key
//! ([`LoraSet::key`]) joins the UNet's and the text encoders' keys. The
//! worker's variant cache (`kiln_diffusion`'s `lora/variants.rs`) keys each
//! component with [`merge_key`] over its files' hashes; the coordinator keys
//! a task with [`LoraSet::of`] over its recipe's hashes, which admission pins
//! to the files' hashes, so both name one set with one string.

use serde::{Deserialize, Serialize};

use crate::extras::LoraRef;

/// Returns the key of one component merged with `entries`, (content hash,
/// weight) in recipe order: `HASH@WEIGHTBITS` joined by `,`, the weight's
/// exact `f64` bits in 16 hex digits. Empty for no entries: the base component.
pub fn merge_key<'a>(entries: impl IntoIterator<Item = (&'a str, f64)>) -> String {
    entries
        .into_iter()
        .map(|(hash, weight)| format!("{hash}@{:016x}", weight.to_bits()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Returns the key of a set from its components' [`merge_key`]s: empty when
/// both are (the base model), else `UNET|TEXT`.
pub fn set_key(unet: &str, text: &str) -> String {
    if unet.is_empty() && text.is_empty() {
        String::new()
    } else {
        format!("{unet}|{text}")
    }
}

/// The LoRAs a recipe merges into each component, with their weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraSet {
    /// (content hash, UNet weight) of each LoRA whose UNet weight is not 0, in recipe order.
    pub unet: Vec<(String, f64)>,
    /// (content hash, text-encoder weight) of each LoRA whose text weight is not 0, in recipe order.
    pub text: Vec<(String, f64)>,
}

impl LoraSet {
    /// Returns the set of a recipe's `loras` (its `extras.loras`), with the
    /// hashes the recipe carries.
    pub fn of(loras: &[LoraRef]) -> Self {
        let pick = |weight: fn(&LoraRef) -> f64| {
            loras
                .iter()
                .filter(|l| weight(l) != 0.0)
                .map(|l| (l.hash.clone(), weight(l)))
                .collect()
        };
        Self {
            unet: pick(|l| l.unet_weight),
            text: pick(|l| l.te_weight),
        }
    }

    /// Returns the set's key ([`set_key`] of both components' [`merge_key`]s):
    /// empty when the set changes nothing.
    pub fn key(&self) -> String {
        let component = |e: &[(String, f64)]| merge_key(e.iter().map(|(h, w)| (h.as_str(), *w)));
        set_key(&component(&self.unet), &component(&self.text))
    }
}

/// A LoRA set a worker holds ready for one of its models: every component the
/// set changes is merged and kept, so a task with this set renders without a merge.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReadyLoraSet {
    /// The catalog name of the model the variants were merged from.
    pub model: String,
    /// The set's [`LoraSet::key`].
    pub set: String,
}

impl ReadyLoraSet {
    /// The set a render of `recipe` merges and keeps for its model; `None`
    /// when its LoRAs change nothing.
    pub fn of(recipe: &crate::recipe::Recipe) -> Option<Self> {
        let set = LoraSet::of(&recipe.extras.loras).key();
        (!set.is_empty()).then(|| Self {
            model: recipe.model.clone(),
            set,
        })
    }
}

/// Most ready LoRA sets one worker's report may carry; the coordinator reads no more.
pub const MAX_READY_SETS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(hash: &str, unet: f64, te: f64) -> LoraRef {
        LoraRef {
            name: format!("n{hash}"),
            hash: hash.into(),
            unet_weight: unet,
            te_weight: te,
        }
    }

    #[test]
    fn a_set_is_keyed_by_hashes_and_exact_weights_per_component() {
        let a = LoraSet::of(&[lora("aa", 0.8, 0.8), lora("bb", 1.0, 0.0)]);
        assert_eq!(
            a.key(),
            format!(
                "aa@{:016x},bb@{:016x}|aa@{:016x}",
                0.8f64.to_bits(),
                1.0f64.to_bits(),
                0.8f64.to_bits()
            )
        );
        // Order matters (deltas are summed in recipe order), and so does every weight bit.
        let swapped = LoraSet::of(&[lora("bb", 1.0, 0.0), lora("aa", 0.8, 0.8)]);
        assert_ne!(a.key(), swapped.key());
        let nudged = LoraSet::of(&[lora("aa", 0.8 + 1e-12, 0.8), lora("bb", 1.0, 0.0)]);
        assert_ne!(a.key(), nudged.key());
        // The name is not part of it: the content is.
        let mut renamed = [lora("aa", 0.8, 0.8), lora("bb", 1.0, 0.0)];
        renamed[0].name = "other".into();
        assert_eq!(LoraSet::of(&renamed).key(), a.key());
    }

    #[test]
    fn a_set_that_changes_nothing_has_the_empty_key() {
        assert_eq!(LoraSet::of(&[]).key(), "");
        assert_eq!(LoraSet::of(&[lora("aa", 0.0, 0.0)]).key(), "");
        let text_only = LoraSet::of(&[lora("aa", 0.0, 0.5)]);
        assert_eq!(text_only.key(), format!("|aa@{:016x}", 0.5f64.to_bits()));
        assert_eq!(set_key("", ""), "");
    }
}
