//! The merged variants of a pipeline's UNet and text encoders, one per LoRA set,
//! kept under a memory budget.
//!
//! A variant is keyed by its component and its LoRA set: the LoRA files' content
//! hashes and weights, in recipe order (the deltas are summed in that order). It is
//! built from the base weights files with the summed deltas added as each tensor
//! is loaded, and kept, least recently used out first, while all variants together
//! stay within the budget (by default room for two variants of every component:
//! two LoRA sets alternating in a queue do not rebuild at every task). A variant
//! larger than the whole budget is built, used and dropped. A set whose deltas
//! leave a component alone (a UNet-only LoRA and the text encoders) is the base
//! component itself.
//!
//! A variant's bytes are its component's weights by the catalog's measure
//! (`inspect::loaded_bytes`). An owner that keeps its own budget over
//! everything a pipeline holds (the worker's `--memory-budget`) sets this
//! budget to `u64::MAX`, asks what a set will hold before a render
//! ([`Variants::needs`]), and drops variants itself ([`Variants::remove`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::super::assets::AssetFile;
use super::super::clip::{ClipConfig, ClipTextModel};
use super::super::error::PipelineError;
use super::super::inspect::loaded_bytes;
use super::super::unet::{Unet, UnetConfig};
use super::super::weights;
use super::{Component, Modules, Targets};

/// LoRAs applied to one component: (file, weight) in recipe order, weights not 0.
#[derive(Clone, Debug, Default)]
pub(crate) struct LoraSet {
    /// The files and their weights.
    pub(crate) entries: Vec<(AssetFile, f64)>,
}

impl LoraSet {
    /// Returns the set's key: each file's hash and the exact bits of its weight
    /// ([`kiln_domain::lora_set::merge_key`], the one definition the coordinator
    /// keys tasks with). Empty for the empty set (the base model).
    pub(crate) fn key(&self) -> String {
        kiln_domain::lora_set::merge_key(self.entries.iter().map(|(f, w)| (f.hash.as_str(), *w)))
    }

    /// Returns true when no LoRA applies.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A built variant; `Base` when the set leaves the component as it is.
#[derive(Clone)]
enum Built {
    Base,
    Unet(Arc<Unet>),
    Text(Arc<ClipTextModel>),
}

/// One cached variant.
struct Entry {
    key: (Component, String),
    built: Built,
    bytes: u64,
    used: u64,
}

/// The cached variants, least recently used first out.
#[derive(Default)]
struct Cache {
    entries: Vec<Entry>,
    tick: u64,
    /// The (UNet key, text key) pairs renders applied, least recently first, at
    /// most [`MAX_READY_SETS`](kiln_domain::lora_set::MAX_READY_SETS): the sets
    /// [`Variants::ready`] may report, each while its variants are kept.
    applied: std::collections::VecDeque<(String, String)>,
}

/// What a variant is built from, and the variants built.
pub(crate) struct Variants {
    /// The UNet's weights file and architecture.
    unet: (PathBuf, UnetConfig),
    /// Each text encoder's weights file and architecture.
    text: Vec<(PathBuf, ClipConfig)>,
    /// The modules LoRA files may target.
    targets: Targets,
    /// Bytes of one copy of each component in `dtype`.
    bytes: BTreeMap<Component, u64>,
    /// The components' dtype.
    dtype: DType,
    /// Where they live.
    device: Device,
    /// Most bytes of variants kept.
    budget: u64,
    /// Built variants. A std mutex: held for lookups and inserts, never while building.
    cache: Mutex<Cache>,
}

impl Variants {
    /// Reads the tensor shapes of the UNet and text encoder files (their headers only).
    ///
    /// # Errors
    ///
    /// `Io` or `Weights` when a file cannot be read as safetensors.
    pub(crate) fn new(
        unet: (PathBuf, UnetConfig),
        text: Vec<(PathBuf, ClipConfig)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let mut bytes = BTreeMap::new();
        let size = |shapes: &BTreeMap<String, Vec<usize>>| -> u64 {
            loaded_bytes(
                shapes
                    .values()
                    .map(|s| s.iter().product::<usize>() as u64)
                    .sum(),
            )
        };
        let unet_shapes = weights::shapes(&unet.0)?;
        bytes.insert(Component::Unet, size(&unet_shapes));
        let mut text_modules = Vec::with_capacity(text.len());
        for (i, (file, _)) in text.iter().enumerate() {
            let shapes = weights::shapes(file)?;
            bytes.insert(Component::Text(i), size(&shapes));
            text_modules.push(Modules::new(&shapes));
        }
        let budget = 2 * bytes.values().sum::<u64>();
        Ok(Self {
            unet,
            text,
            targets: Targets {
                unet: Modules::new(&unet_shapes),
                text: text_modules,
            },
            bytes,
            dtype,
            device: device.clone(),
            budget,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// The modules LoRA files may target.
    pub(crate) fn targets(&self) -> &Targets {
        &self.targets
    }

    /// Sets the most bytes of merged variants kept (0 keeps none; `u64::MAX`
    /// never evicts, leaving that to the owner's [`Variants::remove`]).
    pub(crate) fn set_budget(&mut self, bytes: u64) {
        self.budget = bytes;
        self.cache().entries.clear();
    }

    /// Returns the number of variants kept and their bytes.
    pub(crate) fn resident(&self) -> (usize, u64) {
        let cache = self.cache();
        (
            cache.entries.len(),
            cache.entries.iter().map(|e| e.bytes).sum(),
        )
    }

    /// Records that a render applied `unet` to the UNet and `text` to the text
    /// encoders (after their variants were built), for [`Variants::ready`].
    pub(crate) fn applied(&self, unet: &LoraSet, text: &LoraSet) {
        let pair = (unet.key(), text.key());
        if pair.0.is_empty() && pair.1.is_empty() {
            return;
        }
        let mut cache = self.cache();
        cache.applied.retain(|p| *p != pair);
        cache.applied.push_back(pair);
        while cache.applied.len() > kiln_domain::lora_set::MAX_READY_SETS {
            cache.applied.pop_front();
        }
    }

    /// Returns the keys ([`kiln_domain::lora_set::set_key`]) of the applied LoRA
    /// sets whose every changed component is still kept: a render with one of
    /// them merges nothing. Most recently applied first.
    pub(crate) fn ready(&self) -> Vec<String> {
        let cache = self.cache();
        let kept = |component: Component, key: &str| {
            key.is_empty()
                || cache
                    .entries
                    .iter()
                    .any(|e| e.key.0 == component && e.key.1 == key)
        };
        cache
            .applied
            .iter()
            .rev()
            .filter(|(unet, text)| {
                kept(Component::Unet, unet)
                    && (0..self.targets.text.len()).all(|i| kept(Component::Text(i), text))
            })
            .map(|(unet, text)| kiln_domain::lora_set::set_key(unet, text))
            .collect()
    }

    /// Returns every variant kept that holds memory: its key and bytes.
    /// Sets that leave their component alone are kept too (so that their file is
    /// not read again) but hold nothing, and are not listed.
    pub(crate) fn held(&self) -> Vec<((Component, String), u64)> {
        self.cache()
            .entries
            .iter()
            .filter(|e| !matches!(e.built, Built::Base))
            .map(|e| (e.key.clone(), e.bytes))
            .collect()
    }

    /// Drops the variant of `component` (by name, [`Component::name`]) and LoRA
    /// set `key`; returns whether one was kept.
    pub(crate) fn remove(&self, component: &str, key: &str) -> bool {
        let mut cache = self.cache();
        let before = cache.entries.len();
        cache
            .entries
            .retain(|e| !(e.key.0.name() == component && e.key.1 == key));
        cache.entries.len() != before
    }

    /// Returns the bytes the variant of `component` with `set` will hold, or
    /// `None` when it holds nothing: the set is empty, or no file of it names a
    /// module of the component. Reads the files' headers only; a file whose keys
    /// cannot all be placed counts as changing every component (the render then
    /// refuses it, naming the key).
    pub(crate) fn needs(&self, component: Component, set: &LoraSet) -> Option<u64> {
        if set.is_empty() {
            return None;
        }
        let key = (component, set.key());
        if let Some(entry) = self.cache().entries.iter().find(|e| e.key == key) {
            return (!matches!(entry.built, Built::Base)).then_some(entry.bytes);
        }
        let touched = set.entries.iter().any(|(file, _)| {
            touches(&file.path, &self.targets).is_none_or(|c| c.contains(&component))
        });
        touched.then(|| self.bytes.get(&component).copied().unwrap_or(0))
    }

    /// Returns the UNet with `set` merged in, or `None` when it changes nothing.
    ///
    /// # Errors
    ///
    /// `Weights` when a LoRA file does not fit the model (naming the key) or cannot
    /// be read; `Candle` when merging fails.
    pub(crate) fn unet(&self, set: &LoraSet) -> Result<Option<Arc<Unet>>, PipelineError> {
        match self.get_or_build(Component::Unet, set)? {
            Built::Unet(u) => Ok(Some(u)),
            _ => Ok(None),
        }
    }

    /// Returns text encoder `index` with `set` merged in, or `None` when it changes nothing.
    ///
    /// # Errors
    ///
    /// As [`Variants::unet`].
    pub(crate) fn text(
        &self,
        index: usize,
        set: &LoraSet,
    ) -> Result<Option<Arc<ClipTextModel>>, PipelineError> {
        match self.get_or_build(Component::Text(index), set)? {
            Built::Text(t) => Ok(Some(t)),
            _ => Ok(None),
        }
    }

    /// Locks the cache; a panic elsewhere leaves it consistent, so poison is ignored.
    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get_or_build(&self, component: Component, set: &LoraSet) -> Result<Built, PipelineError> {
        if set.is_empty() {
            return Ok(Built::Base);
        }
        let key = (component, set.key());
        {
            let mut cache = self.cache();
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(entry) = cache.entries.iter_mut().find(|e| e.key == key) {
                entry.used = tick;
                return Ok(entry.built.clone());
            }
        }
        let started = std::time::Instant::now();
        let built = self.build(component, set)?;
        let bytes = match built {
            Built::Base => 0,
            _ => self.bytes.get(&component).copied().unwrap_or(0),
        };
        tracing::debug!(
            component = component.name(),
            loras = set.entries.len(),
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "LoRA variant merged"
        );
        let mut cache = self.cache();
        if bytes <= self.budget && !cache.entries.iter().any(|e| e.key == key) {
            while !cache.entries.is_empty()
                && cache.entries.iter().map(|e| e.bytes).sum::<u64>() + bytes > self.budget
            {
                let coldest = cache
                    .entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.used)
                    .map(|(i, _)| i);
                if let Some(i) = coldest {
                    cache.entries.swap_remove(i);
                }
            }
            cache.tick += 1;
            let used = cache.tick;
            cache.entries.push(Entry {
                key,
                built: built.clone(),
                bytes,
                used,
            });
        }
        Ok(built)
    }

    /// Merges the set's deltas for `component` and builds it from its base file.
    fn build(&self, component: Component, set: &LoraSet) -> Result<Built, PipelineError> {
        let mut sum: HashMap<String, Tensor> = HashMap::new();
        for (file, weight) in &set.entries {
            let changed = super::read(&file.path, &self.targets, component, &self.device)?;
            for (name, delta) in changed {
                let scaled = (delta * *weight)?;
                let total = match sum.remove(&name) {
                    Some(before) => (before + scaled)?,
                    None => scaled,
                };
                sum.insert(name, total);
            }
        }
        if sum.is_empty() {
            return Ok(Built::Base);
        }
        match component {
            Component::Unet => {
                let (file, config) = &self.unet;
                let unet = weights::build_merged(file, self.dtype, &self.device, sum, |vb| {
                    Unet::new(vb, config)
                })?;
                Ok(Built::Unet(Arc::new(unet)))
            }
            Component::Text(i) => {
                let Some((file, config)) = self.text.get(i) else {
                    return Ok(Built::Base);
                };
                let model = weights::build_merged(file, self.dtype, &self.device, sum, |vb| {
                    ClipTextModel::new(vb, config)
                })?;
                Ok(Built::Text(Arc::new(model)))
            }
        }
    }
}

/// Returns the components a LoRA file names modules of, from its header; `None`
/// when the header cannot be read or a key cannot be placed.
fn touches(file: &std::path::Path, targets: &Targets) -> Option<BTreeSet<Component>> {
    let keys = weights::tensor_shapes(file).ok()?;
    keys.iter()
        .map(|(key, _)| {
            super::format::place(key, &targets.unet, &targets.text)
                .ok()
                .map(|p| p.component)
        })
        .collect()
}
