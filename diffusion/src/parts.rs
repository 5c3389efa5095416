//! What a pipeline holds beyond its base model: the UNets and text encoders
//! merged with LoRA sets (`lora::variants`) and the ControlNets it loaded
//! (`controlnet`), each with its bytes by the catalog's measure
//! (`inspect::loaded_bytes`), so that the pipeline's owner can keep them and
//! its models under one memory budget: ask what a render will hold
//! ([`needed`]), see what is held ([`held`]) and drop a part ([`remove`]).
//!
//! The pipeline keeps what it builds: merged variants under its own LoRA
//! budget (`Pipeline::set_lora_budget`; `u64::MAX` leaves eviction to the
//! owner), ControlNets until dropped. The owner decides; nothing here knows
//! of workers or catalogs.

use kiln_domain::error::quote;

use super::lora::Component;
use super::lora::variants::LoraSet;
use super::{Pipeline, RenderInput};

/// Something a pipeline holds beyond its base model, built on first use.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// A component (`unet`, `text_encoder`, `text_encoder_2`) merged with a
    /// LoRA set, keyed by the set: each file's hash and weight, in recipe order.
    LoraVariant {
        /// The component's folder name.
        component: &'static str,
        /// The LoRA set's key.
        loras: String,
    },
    /// A ControlNet, by content hash.
    ControlNet {
        /// The ControlNet's content hash.
        hash: String,
    },
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::LoraVariant { component, loras } => {
                let hashes: Vec<&str> = loras
                    .split(',')
                    .map(|entry| &entry[..entry.len().min(12)])
                    .collect();
                write!(f, "{component} merged with LoRAs {}", hashes.join(", "))
            }
            Part::ControlNet { hash } => write!(f, "ControlNet {}", &hash[..hash.len().min(12)]),
        }
    }
}

/// A part a render needs, its bytes, and how a person would name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    /// The part.
    pub part: Part,
    /// The bytes it holds (or will once built).
    pub bytes: u64,
    /// The part named by the recipe's names: `unet merged with LoRA "inkwash" 0.7`,
    /// `ControlNet "pose"`.
    pub label: String,
}

/// Returns the parts rendering `inputs` holds while it runs, each once, in the
/// order the inputs first name them; those held already are listed too. A LoRA
/// or ControlNet the pipeline cannot resolve is left out: the render refuses it.
pub(crate) fn needed(p: &Pipeline, inputs: &[RenderInput<'_>]) -> Vec<Needed> {
    let mut out: Vec<Needed> = Vec::new();
    let mut add = |n: Needed| {
        if !out.iter().any(|o| o.part == n.part) {
            out.push(n);
        }
    };
    for input in inputs {
        let recipe = input.recipe;
        if let Ok((unet_set, text_set)) = super::adapters::lora_sets(p, recipe) {
            let text =
                (0..p.variants.targets().text.len()).map(|i| (Component::Text(i), &text_set));
            for (component, set) in std::iter::once((Component::Unet, &unet_set)).chain(text) {
                if let Some(bytes) = p.variants.needs(component, set) {
                    add(Needed {
                        part: Part::LoraVariant {
                            component: component.name(),
                            loras: set.key(),
                        },
                        bytes,
                        label: variant_label(component, set),
                    });
                }
            }
        }
        for entry in &recipe.extras.controlnets {
            if entry.scale == 0.0 {
                continue;
            }
            let Some(file) = p.assets.controlnets.get(&entry.model) else {
                continue;
            };
            if !entry.hash.is_empty() && entry.hash != file.hash {
                continue;
            }
            if let Some(bytes) = p.controlnets.needs(file) {
                add(Needed {
                    part: Part::ControlNet {
                        hash: file.hash.clone(),
                    },
                    bytes,
                    label: format!("ControlNet {}", quote(&file.name)),
                });
            }
        }
    }
    out
}

/// `unet merged with LoRA "inkwash" 0.7, "mira" 1`.
fn variant_label(component: Component, set: &LoraSet) -> String {
    let loras: Vec<String> = set
        .entries
        .iter()
        .map(|(file, weight)| format!("{} {weight}", quote(&file.name)))
        .collect();
    format!("{} merged with LoRA {}", component.name(), loras.join(", "))
}

/// Returns every part the pipeline holds now, with its bytes.
pub(crate) fn held(p: &Pipeline) -> Vec<(Part, u64)> {
    let variants = p
        .variants
        .held()
        .into_iter()
        .map(|((component, loras), bytes)| {
            (
                Part::LoraVariant {
                    component: component.name(),
                    loras,
                },
                bytes,
            )
        });
    let controlnets = p
        .controlnets
        .held()
        .into_iter()
        .map(|(hash, bytes)| (Part::ControlNet { hash }, bytes));
    variants.chain(controlnets).collect()
}

/// Drops a part; returns whether the pipeline held it. A render under way that
/// uses it keeps it until the render ends.
pub(crate) fn remove(p: &Pipeline, part: &Part) -> bool {
    match part {
        Part::LoraVariant { component, loras } => p.variants.remove(component, loras),
        Part::ControlNet { hash } => p.controlnets.remove(hash),
    }
}
