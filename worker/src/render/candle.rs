//! The `candle` renderer: real diffusion on the models of its catalog, loaded
//! on first use and kept resident under an optional memory budget.
//!
//! Every model given with `--model NAME=DIR` is located, hashed and sized when
//! the renderer opens ([`CatalogEntry`]); those that fit the budget are loaded
//! then, so a worker without a budget starts with everything resident, as
//! before. A recipe for a model that is not resident loads it on the render
//! thread, first evicting the least recently used models that must go
//! ([`Residency`]).
//!
//! The budget covers what the pipelines hold beyond their models too: the
//! UNets and text encoders merged with LoRA sets and the ControlNets
//! ([`Part`]). Before a render the pipeline names the parts it will hold
//! ([`Pipeline::parts_needed`]); the residency makes room for the missing ones,
//! never evicting the model or a part the render uses, and refuses a task whose
//! model and parts together exceed the budget (tasks of a batch that fit one
//! by one are rendered one by one). After the render the parts the pipeline
//! holds are recorded, and parts evicted later are dropped from their pipeline
//! ([`Pipeline::drop_part`]). With a budget a pipeline evicts no variant
//! itself; without one it keeps its own LoRA budget (twice the UNet and text
//! encoders) and every ControlNet it loaded, and the residency only counts them.
//!
//! Tasks handed over together ([`Renderer::render_batch`]) are rendered model by
//! model with [`Pipeline::render_batch`], which denoises compatible ones as one
//! UNet batch; each task's PNG is byte-identical to its render alone. All models
//! are loaded in one [`Precision`] (`--dtype`), which is part of the
//! determinism class.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Device;

use super::{ModelInfo, PreviewSink, RenderError, RenderTask, Rendered, Renderer};
use crate::catalog::{CatalogEntry, Evicted, OverBudget, Residency, Slot, format_size};
use crate::metrics;
use kiln_diffusion::output::encode_png;
use kiln_diffusion::{
    Assets, Pipeline, PipelineError, Precision, RenderInput, model_hash, resident_bytes,
};
use kiln_diffusion::{VaeTile, determinism_class};
use kiln_domain::lora_set::ReadyLoraSet;
use kiln_domain::preview::Preview;

/// Renders with candle pipelines, loading catalog models on demand and
/// keeping them resident under a memory budget.
pub struct CandleRenderer {
    /// Every model this worker can render, by name.
    catalog: BTreeMap<String, CatalogEntry>,
    /// The loaded pipelines and the parts they hold. A std mutex is enough:
    /// only the render thread takes it, and never across an `.await`; it is
    /// held while a model loads, since the next render needs that model or
    /// the memory it frees.
    resident: Mutex<Residency<Arc<Pipeline>>>,
    /// The resident models' names and their pipelines' ready LoRA sets as
    /// last published ([`CandleRenderer::publish`]): what the agent's lease
    /// loop reads, which must not wait for a model load holding `resident`.
    published: Mutex<Published>,
    /// Where pipelines are loaded.
    device: Device,
    /// The dtype every model is loaded in.
    precision: Precision,
    /// The determinism class announced at registration.
    class: String,
    /// The LoRAs, embeddings and ControlNets every pipeline is given.
    assets: Arc<Assets>,
    /// Tiled VAE decoding for every pipeline (`--vae-tile`); part of the class.
    vae_tile: Option<VaeTile>,
}

/// A model that cannot be put in the catalog or loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The folder is incomplete or its weights cannot be loaded.
    #[error("model {name:?} from {dir}: {source}")]
    Model {
        /// Catalog name.
        name: String,
        /// The folder given.
        dir: String,
        /// What went wrong (boxed: pipeline errors are large).
        source: Box<PipelineError>,
    },
    /// The model alone needs more memory than the whole budget.
    #[error("model {name:?} {source} (--memory-budget)")]
    OverBudget {
        /// Catalog name.
        name: String,
        /// Its size and the budget.
        source: OverBudget,
    },
}

impl LoadError {
    fn model(name: &str, dir: &std::path::Path, source: PipelineError) -> Self {
        LoadError::Model {
            name: name.to_string(),
            dir: dir.display().to_string(),
            source: Box::new(source),
        }
    }
}

impl CandleRenderer {
    /// Loads every `(name, folder)` onto `device` in f32 and keeps them all resident.
    ///
    /// # Errors
    /// The first model that fails to load, named with its folder.
    pub fn load(models: &[(String, PathBuf)], device: &Device) -> Result<Self, LoadError> {
        Self::open(models, device, Precision::F32, None)
    }

    /// Opens a catalog of `(name, folder)` models on `device` in `precision`,
    /// under a memory budget in bytes (`None`: no limit).
    ///
    /// Every folder is located, hashed and sized now, so an incomplete folder
    /// fails the start rather than a render. Models are then loaded in the
    /// order given while they fit the budget without evicting; the rest load
    /// on first use.
    ///
    /// # Errors
    /// The first model whose folder is incomplete or fails to load, or that
    /// alone needs more than the budget.
    pub fn open(
        models: &[(String, PathBuf)],
        device: &Device,
        precision: Precision,
        budget: Option<u64>,
    ) -> Result<Self, LoadError> {
        Self::open_with(models, device, precision, budget, Arc::default())
    }

    /// [`CandleRenderer::open`] with the LoRAs, embeddings and ControlNets that
    /// every pipeline it loads is given ([`Pipeline::set_assets`]) and that the
    /// worker announces.
    ///
    /// # Errors
    /// As [`CandleRenderer::open`].
    pub fn open_with(
        models: &[(String, PathBuf)],
        device: &Device,
        precision: Precision,
        budget: Option<u64>,
        assets: Arc<Assets>,
    ) -> Result<Self, LoadError> {
        let mut catalog = BTreeMap::new();
        for (name, dir) in models {
            let hash = model_hash(dir).map_err(|e| LoadError::model(name, dir, e))?;
            let bytes = resident_bytes(dir).map_err(|e| LoadError::model(name, dir, e))?;
            if let Some(budget) = budget
                && bytes > budget
            {
                return Err(LoadError::OverBudget {
                    name: name.clone(),
                    source: OverBudget { bytes, budget },
                });
            }
            catalog.insert(
                name.clone(),
                CatalogEntry {
                    name: name.clone(),
                    dir: Some(dir.clone()),
                    hash,
                    bytes,
                },
            );
        }
        let mut resident = Residency::new(budget);
        for (name, dir) in models {
            let Some(entry) = catalog.get(name) else {
                continue;
            };
            if resident.names().contains(&name.as_str()) || !resident.fits_now(entry.bytes) {
                continue;
            }
            let pipeline = load_pipeline(entry, dir, device, precision, &assets, budget)?;
            resident
                .insert(Slot::model(name), entry.bytes, Arc::new(pipeline), &[])
                .map_err(|source| LoadError::OverBudget {
                    name: name.clone(),
                    source,
                })?;
        }
        metrics::resident_bytes(resident.used());
        let names = resident.names().iter().map(|n| n.to_string()).collect();
        let waiting: Vec<&str> = catalog
            .keys()
            .map(String::as_str)
            .filter(|n| !resident.names().contains(n))
            .collect();
        if !waiting.is_empty() {
            tracing::info!(models = ?waiting, budget = %budget.map_or("none".into(), format_size), "models left to load on first use");
        }
        Ok(Self {
            catalog,
            resident: Mutex::new(resident),
            published: Mutex::new(Published {
                names,
                sets: Vec::new(),
            }),
            device: device.clone(),
            precision,
            class: determinism_class(device, precision),
            assets,
            vae_tile: None,
        })
    }

    /// Decodes latents larger than `tile` tile by tile in every pipeline, resident
    /// or loaded later (`--vae-tile`), and names the tile in the determinism class:
    /// tiled images larger than a tile differ from untiled ones.
    pub fn set_vae_tile(&mut self, tile: Option<VaeTile>) {
        self.vae_tile = tile;
        self.class = format!(
            "{}{}",
            determinism_class(&self.device, self.precision),
            VaeTile::class_suffix(tile)
        );
        let resident = self.lock();
        for name in resident.names() {
            if let Some(pipeline) = resident.peek(name) {
                pipeline.set_vae_tile(tile);
            }
        }
    }

    /// Returns a renderer over pipelines already loaded (shared by the
    /// in-process workers of `kiln render`); they stay resident, no budget.
    /// Its precision is the pipelines' (f32 when there are none; they are
    /// expected to share one), and so are its assets.
    pub fn from_pipelines(models: BTreeMap<String, Arc<Pipeline>>, device: &Device) -> Self {
        let precision = models
            .values()
            .next()
            .map_or(Precision::F32, |p| p.precision());
        let assets = Arc::new(
            models
                .values()
                .next()
                .map(|p| p.assets().clone())
                .unwrap_or_default(),
        );
        let vae_tile = models.values().next().and_then(|p| p.vae_tile());
        let mut resident = Residency::new(None);
        let mut catalog = BTreeMap::new();
        for (name, pipeline) in models {
            catalog.insert(
                name.clone(),
                CatalogEntry {
                    name: name.clone(),
                    dir: None,
                    hash: pipeline.model_hash().to_string(),
                    bytes: 0,
                },
            );
            // Without a budget nothing is ever refused or evicted.
            let _ = resident.insert(Slot::model(&name), 0, pipeline, &[]);
        }
        let names = resident.names().iter().map(|n| n.to_string()).collect();
        Self {
            catalog,
            resident: Mutex::new(resident),
            published: Mutex::new(Published {
                names,
                sets: Vec::new(),
            }),
            device: device.clone(),
            precision,
            class: format!(
                "{}{}",
                determinism_class(device, precision),
                VaeTile::class_suffix(vae_tile)
            ),
            assets,
            vae_tile,
        }
    }

    /// Returns the pipelines resident now, by name.
    pub fn pipelines(&self) -> BTreeMap<String, Arc<Pipeline>> {
        listed(&self.lock())
    }

    /// Returns the catalog: every model this renderer can render.
    pub fn catalog(&self) -> impl Iterator<Item = &CatalogEntry> {
        self.catalog.values()
    }

    /// Returns the names of the resident models, least recently used first.
    pub fn resident(&self) -> Vec<String> {
        self.lock().names().iter().map(|n| n.to_string()).collect()
    }

    /// Returns every resident slot, models and the parts their pipelines hold,
    /// least recently used first.
    pub fn resident_slots(&self) -> Vec<Slot> {
        self.lock().slots().into_iter().cloned().collect()
    }

    /// Returns the bytes resident now, models and parts: what the
    /// `kiln_models_resident_bytes` gauge shows.
    pub fn resident_bytes(&self) -> u64 {
        self.lock().used()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Residency<Arc<Pipeline>>> {
        // The residency is consistent between calls, so a panic elsewhere leaves it usable.
        self.resident.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a changed residency: the resident-bytes gauge, and the names
    /// and ready LoRA sets the agent reads. Called after every load, eviction
    /// and render, so a set merged by a render is published when it ends.
    fn publish(&self, resident: &Residency<Arc<Pipeline>>) {
        metrics::resident_bytes(resident.used());
        let names = resident.names().iter().map(|n| n.to_string()).collect();
        let sets = listed(resident)
            .into_iter()
            .flat_map(|(model, p)| {
                p.ready_lora_sets()
                    .into_iter()
                    .map(move |set| ReadyLoraSet {
                        model: model.clone(),
                        set,
                    })
            })
            .collect();
        *self.published_lock() = Published { names, sets };
    }

    /// The last published residency; a panic elsewhere leaves it usable.
    fn published_lock(&self) -> std::sync::MutexGuard<'_, Published> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the pipeline of a catalog model, loading it (and evicting the
    /// least recently used models that must go) when it is not resident.
    fn pipeline(&self, name: &str) -> Result<Arc<Pipeline>, RenderError> {
        let model_error = |message: String| RenderError::Model {
            model: name.to_string(),
            message,
        };
        let entry = self
            .catalog
            .get(name)
            .ok_or_else(|| model_error("not in this worker's catalog".into()))?;
        let mut resident = self.lock();
        if let Some(pipeline) = resident.get(name) {
            return Ok(pipeline);
        }
        let Some(dir) = &entry.dir else {
            return Err(model_error(
                "was handed over loaded and cannot be loaded again".into(),
            ));
        };
        let evicted = resident
            .make_room(entry.bytes, &[])
            .map_err(|e| model_error(e.to_string()))?;
        // Free the evicted weights before loading the new ones.
        release(evicted, name);
        self.publish(&resident);
        let budget = resident.budget();
        let pipeline = load_pipeline(
            entry,
            dir,
            &self.device,
            self.precision,
            &self.assets,
            budget,
        )
        .map_err(|e| {
            let text = e.to_string();
            if text.to_ascii_lowercase().contains("out of memory") {
                RenderError::OutOfMemory(text)
            } else {
                model_error(text)
            }
        })?;
        pipeline.set_vae_tile(self.vae_tile);
        let pipeline = Arc::new(pipeline);
        let inserted = resident
            .insert(Slot::model(name), entry.bytes, pipeline.clone(), &[])
            .map_err(|e| model_error(e.to_string()));
        self.publish(&resident);
        release(inserted?, name);
        Ok(pipeline)
    }

    /// Makes room for the parts rendering `inputs` with `model`'s pipeline
    /// holds: marks those resident as used and evicts the coldest other entries
    /// until the missing ones fit, never the model or a part the render uses.
    /// Returns the slots the render keeps.
    ///
    /// # Errors
    /// A [`RenderError::Model`] naming the parts when the model and the parts
    /// together exceed the whole budget; nothing is evicted then.
    fn reserve(
        &self,
        model: &str,
        pipeline: &Pipeline,
        inputs: &[RenderInput<'_>],
    ) -> Result<Vec<Slot>, RenderError> {
        let needed = pipeline.parts_needed(inputs);
        let mut keep = vec![Slot::model(model)];
        keep.extend(needed.iter().map(|n| Slot::part(model, n.part.clone())));
        let mut resident = self.lock();
        let mut missing = 0u64;
        for (slot, n) in keep.iter().skip(1).zip(&needed) {
            if !resident.touch(slot) {
                missing = missing.saturating_add(n.bytes);
            }
        }
        resident.touch(&keep[0]);
        let evicted = resident.make_room(missing, &keep).map_err(|e| {
            let labels: Vec<&str> = needed.iter().map(|n| n.label.as_str()).collect();
            RenderError::Model {
                model: model.to_string(),
                message: format!("the model with {} {e} (--memory-budget)", labels.join(", ")),
            }
        })?;
        release(evicted, model);
        self.publish(&resident);
        Ok(keep)
    }

    /// Records what `model`'s pipeline holds after a render: parts it built
    /// are added (evicting the coldest entries other than `keep`; a part that
    /// cannot fit even so is dropped from the pipeline: built, used and
    /// dropped), parts it no longer holds are forgotten.
    fn settle(&self, model: &str, pipeline: &Arc<Pipeline>, keep: &[Slot]) {
        let held = pipeline.parts();
        let mut resident = self.lock();
        for part in resident.parts_of(model) {
            if !held.iter().any(|(h, _)| *h == part) {
                resident.remove(&Slot::part(model, part));
            }
        }
        for (part, bytes) in held {
            let slot = Slot::part(model, part.clone());
            if resident.contains(&slot) {
                continue;
            }
            match resident.insert(slot, bytes, pipeline.clone(), keep) {
                Ok(evicted) => release(evicted, model),
                Err(e) => {
                    tracing::warn!(%part, %model, error = %e, "part dropped after the render: it does not fit the memory budget");
                    pipeline.drop_part(&part);
                }
            }
        }
        self.publish(&resident);
    }
}

/// Lets evicted entries go: a part is dropped from its pipeline (a model's
/// pipeline goes with its last reference).
fn release(evicted: Evicted<Arc<Pipeline>>, for_model: &str) {
    for (slot, pipeline) in evicted {
        match &slot.part {
            None => tracing::info!(model = %slot.model, %for_model, "model evicted"),
            Some(part) => {
                pipeline.drop_part(part);
                tracing::info!(part = %slot, %for_model, "evicted");
            }
        }
    }
}

/// What a [`CandleRenderer`] last published of its residency.
struct Published {
    /// The resident models' names.
    names: Vec<String>,
    /// Their pipelines' ready LoRA sets.
    sets: Vec<ReadyLoraSet>,
}

/// Returns the pipelines of a residency, by name.
fn listed(resident: &Residency<Arc<Pipeline>>) -> BTreeMap<String, Arc<Pipeline>> {
    resident
        .names()
        .into_iter()
        .filter_map(|n| resident.peek(n).map(|p| (n.to_string(), p)))
        .collect()
}

/// Loads a catalog model, gives it the worker's assets, and checks that its
/// folder still has the hash the worker announced. Under a worker budget the
/// pipeline evicts no merged variant itself: the residency does.
fn load_pipeline(
    entry: &CatalogEntry,
    dir: &std::path::Path,
    device: &Device,
    precision: Precision,
    assets: &Arc<Assets>,
    budget: Option<u64>,
) -> Result<Pipeline, LoadError> {
    let started = Instant::now();
    let mut pipeline = Pipeline::load_with(dir, device, precision)
        .map_err(|e| LoadError::model(&entry.name, dir, e))?;
    pipeline.set_assets(assets.clone());
    if budget.is_some() {
        pipeline.set_lora_budget(u64::MAX);
    }
    if pipeline.model_hash() != entry.hash {
        return Err(LoadError::model(
            &entry.name,
            dir,
            PipelineError::Config {
                path: dir.to_path_buf(),
                message: format!(
                    "the folder changed since the worker started (hash {} then, {} now): restart the worker",
                    entry.hash,
                    pipeline.model_hash()
                ),
            },
        ));
    }
    metrics::model_loaded(&entry.name, started.elapsed());
    tracing::info!(model = %entry.name, dir = %dir.display(), hash = %entry.hash, bytes = %format_size(entry.bytes), ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok(pipeline)
}

impl Renderer for CandleRenderer {
    /// Announces the whole catalog, resident or not: see [`crate::catalog`] for why.
    fn models(&self) -> Vec<ModelInfo> {
        self.catalog
            .values()
            .map(|entry| ModelInfo {
                name: entry.name.clone(),
                hash: entry.hash.clone(),
            })
            .collect()
    }

    fn determinism_class(&self) -> String {
        self.class.clone()
    }

    fn assets(&self) -> Arc<Assets> {
        self.assets.clone()
    }

    /// Reports each resident pipeline's ready LoRA sets
    /// ([`Pipeline::ready_lora_sets`]) as last published: the agent asks
    /// before every lease, on the async runtime, so this never waits for a
    /// model load holding the residency.
    fn ready_lora_sets(&self) -> Vec<ReadyLoraSet> {
        self.published_lock().sets.clone()
    }

    /// The models resident now, not the whole catalog, as last published:
    /// the lease loop calls this on the async runtime, so it never waits for a
    /// model load.
    fn resident(&self) -> Vec<String> {
        self.published_lock().names.clone()
    }

    fn render(
        &self,
        task: &RenderTask,
        on_step: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Rendered, RenderError> {
        let mut results =
            self.render_batch(std::slice::from_ref(task), &mut |_, done| on_step(done));
        results
            .pop()
            .unwrap_or_else(|| Err(RenderError::Internal("the batch returned nothing".into())))
    }

    fn render_batch(
        &self,
        tasks: &[RenderTask],
        on_step: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Vec<Result<Rendered, RenderError>> {
        let mut ignore = |_: usize, _: Preview| {};
        let mut previews = PreviewSink {
            every: 0,
            send: &mut ignore,
        };
        self.render_batch_with_previews(tasks, on_step, &mut previews)
    }

    fn render_batch_with_previews(
        &self,
        tasks: &[RenderTask],
        on_step: &mut dyn FnMut(usize, u32) -> bool,
        previews: &mut PreviewSink<'_>,
    ) -> Vec<Result<Rendered, RenderError>> {
        let mut results: Vec<Option<Result<Rendered, RenderError>>> =
            tasks.iter().map(|_| None).collect();
        // Model by model, in order of first appearance.
        let mut models: Vec<&str> = Vec::new();
        for task in tasks {
            if !models.contains(&task.recipe.model.as_str()) {
                models.push(&task.recipe.model);
            }
        }
        for model in models {
            let members: Vec<usize> = (0..tasks.len())
                .filter(|&i| tasks[i].recipe.model == model)
                .collect();
            let mut runnable = Vec::with_capacity(members.len());
            for &i in &members {
                match self.check(&tasks[i]) {
                    Ok(()) => runnable.push(i),
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            if runnable.is_empty() {
                continue;
            }
            let pipeline = match self.pipeline(model) {
                Ok(p) => p,
                Err(e) => {
                    for &i in &runnable {
                        results[i] = Some(Err(copy_error(&e)));
                    }
                    continue;
                }
            };
            // All of the model's tasks at once if their parts fit beside the
            // model, else one by one (the same bytes: batched = unbatched).
            let mut chunks = VecDeque::from([runnable]);
            while let Some(chunk) = chunks.pop_front() {
                let controls: Vec<Vec<&[u8]>> = chunk
                    .iter()
                    .map(|&i| tasks[i].controls.iter().map(Vec::as_slice).collect())
                    .collect();
                let inputs: Vec<RenderInput<'_>> = chunk
                    .iter()
                    .zip(&controls)
                    .map(|(&i, controls)| RenderInput {
                        recipe: &tasks[i].recipe,
                        init_image: tasks[i].init_image.as_deref(),
                        mask: tasks[i].mask.as_deref(),
                        controls,
                    })
                    .collect();
                let keep = match self.reserve(model, &pipeline, &inputs) {
                    Ok(keep) => keep,
                    Err(_) if chunk.len() > 1 => {
                        for &i in chunk.iter().rev() {
                            chunks.push_front(vec![i]);
                        }
                        continue;
                    }
                    Err(e) => {
                        results[chunk[0]] = Some(Err(e));
                        continue;
                    }
                };
                // The pipeline numbers its inputs; the sink hears of tasks.
                let every = previews.every;
                let mut send = |j: usize, preview: Preview| {
                    if let Some(&i) = chunk.get(j) {
                        (previews.send)(i, preview);
                    }
                };
                let mut sink = PreviewSink {
                    every,
                    send: &mut send,
                };
                let rendered = pipeline.render_batch_with_previews(
                    &inputs,
                    &mut |j, done, _total| chunk.get(j).is_some_and(|&i| on_step(i, done)),
                    &mut sink,
                );
                self.settle(model, &pipeline, &keep);
                for (&i, outcome) in chunk.iter().zip(rendered) {
                    results[i] = Some(outcome.map_err(render_error).and_then(|out| {
                        let encode_start = Instant::now();
                        let png =
                            encode_png(&out.image, &tasks[i].recipe, pipeline.model_hash())
                                .map_err(|e| RenderError::Internal(format!("PNG encoding: {e}")))?;
                        Ok(Rendered {
                            png,
                            model_hash: pipeline.model_hash().to_string(),
                            render_ms: out.timings.total().as_millis() as u64,
                            encode_ms: encode_start.elapsed().as_millis() as u64,
                        })
                    }));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(RenderError::Internal("task not rendered".into()))))
            .collect()
    }
}

impl CandleRenderer {
    /// Checks a task before its model is loaded: the pinned hash against the catalog,
    /// and that the task carries the images its recipe names.
    fn check(&self, task: &RenderTask) -> Result<(), RenderError> {
        let recipe = &task.recipe;
        if let Some(entry) = self.catalog.get(&recipe.model)
            && !recipe.model_hash.is_empty()
            && recipe.model_hash != entry.hash
        {
            return Err(RenderError::Model {
                model: recipe.model.clone(),
                message: format!(
                    "this worker holds hash {}, the recipe pins {}",
                    entry.hash, recipe.model_hash
                ),
            });
        }
        for (field, named, carried) in [
            (
                "init_image",
                recipe.init_image.is_some(),
                task.init_image.is_some(),
            ),
            ("mask", recipe.mask.is_some(), task.mask.is_some()),
        ] {
            if named != carried {
                return Err(RenderError::Internal(format!(
                    "the recipe {} a {field} but the task {} one",
                    if named { "names" } else { "does not name" },
                    if carried { "carries" } else { "does not carry" },
                )));
            }
        }
        if task.controls.len() != recipe.extras.controlnets.len() {
            return Err(RenderError::Internal(format!(
                "the recipe names {} control images but the task carries {}",
                recipe.extras.controlnets.len(),
                task.controls.len()
            )));
        }
        if let Some(message) = super::missing_asset(&self.assets, &recipe.extras) {
            return Err(RenderError::Model {
                model: recipe.model.clone(),
                message,
            });
        }
        Ok(())
    }
}

/// Maps a pipeline error to the render error reported to the coordinator: a recipe
/// the model cannot render (a bad init image or mask included) is bad input.
fn render_error(e: PipelineError) -> RenderError {
    match e {
        PipelineError::Cancelled => RenderError::Cancelled,
        PipelineError::InvalidRecipe { .. } => RenderError::BadInput(e.to_string()),
        other => {
            let text = other.to_string();
            if text.to_ascii_lowercase().contains("out of memory") {
                RenderError::OutOfMemory(text)
            } else {
                RenderError::Internal(text)
            }
        }
    }
}

/// Returns a copy of a render error for each task of a batch that shares it.
fn copy_error(e: &RenderError) -> RenderError {
    match e {
        RenderError::Cancelled => RenderError::Cancelled,
        RenderError::BadInput(m) => RenderError::BadInput(m.clone()),
        RenderError::Model { model, message } => RenderError::Model {
            model: model.clone(),
            message: message.clone(),
        },
        RenderError::OutOfMemory(m) => RenderError::OutOfMemory(m.clone()),
        RenderError::Internal(m) => RenderError::Internal(m.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kiln_proto::recipe::Recipe;

    use super::*;
    use kiln_diffusion::{Part, write_tiny_model};

    /// A 64 px, 2-step recipe for `model`, built the way the coordinator builds them.
    fn recipe(model: &str) -> Recipe {
        let spec = kiln_proto::spec::JobSpec {
            items: vec![kiln_proto::spec::RecipeFields {
                model: Some(model.into()),
                prompt: Some("a (red:1.2) fox".into()),
                seed: Some(7),
                steps: Some(2),
                width: Some(64),
                height: Some(64),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut items = kiln_proto::spec::validate(&spec, 0).expect("valid spec");
        items.remove(0).recipe
    }

    fn render(r: &CandleRenderer, model: &str) -> Result<Rendered, RenderError> {
        r.render(&RenderTask::txt2img(recipe(model)), &mut |_| true)
    }

    fn tiny(dir: &Path) -> PathBuf {
        write_tiny_model(dir).expect("tiny model writes");
        dir.to_path_buf()
    }

    #[test]
    fn models_load_on_first_use_and_the_coldest_is_evicted() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let models = vec![
            ("a".to_string(), tiny(a.path())),
            ("b".to_string(), tiny(b.path())),
        ];
        let one = resident_bytes(a.path()).unwrap();
        // Room for one model and a half: never two at once.
        let r = CandleRenderer::open(&models, &Device::Cpu, Precision::F32, Some(one + one / 2))
            .unwrap();
        assert_eq!(r.resident(), ["a"], "only what fits is loaded at start");
        let announced: Vec<String> = r.models().into_iter().map(|m| m.name).collect();
        assert_eq!(announced, ["a", "b"], "the whole catalog is announced");

        let first = render(&r, "b").unwrap();
        assert_eq!(r.resident(), ["b"], "a was evicted to load b");
        render(&r, "a").unwrap();
        assert_eq!(r.resident(), ["a"]);
        // A reloaded model renders the same bytes.
        let again = render(&r, "b").unwrap();
        assert_eq!(first.png, again.png);

        let e = render(&r, "c").unwrap_err();
        assert!(matches!(e, RenderError::Model { .. }), "{e}");
    }

    #[test]
    fn a_lora_set_is_reported_ready_after_a_render_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(&dir.path().join("tiny"));
        let loras = dir.path().join("loras");
        kiln_diffusion::write_tiny_lora(
            &model,
            &loras.join("inkwash.safetensors"),
            kiln_diffusion::LoraFormat::Kohya,
            1,
        )
        .unwrap();
        let assets = Arc::new(Assets::scan(&[loras], &[], &[]).unwrap());
        let models = vec![("tiny".to_string(), model)];
        let r =
            CandleRenderer::open_with(&models, &Device::Cpu, Precision::F32, None, assets.clone())
                .unwrap();
        assert!(r.ready_lora_sets().is_empty(), "nothing merged yet");
        render(&r, "tiny").unwrap();
        assert!(
            r.ready_lora_sets().is_empty(),
            "a plain render merges nothing"
        );
        // As the coordinator leases it: the LoRA pinned to its file's hash.
        let mut with = recipe("tiny");
        with.extras.loras.push(kiln_domain::extras::LoraRef {
            name: "inkwash".into(),
            hash: assets.loras["inkwash"].hash.clone(),
            unet_weight: 0.8,
            te_weight: 0.8,
        });
        r.render(&RenderTask::txt2img(with.clone()), &mut |_| true)
            .unwrap();
        let key = kiln_domain::lora_set::LoraSet::of(&with.extras.loras).key();
        assert!(!key.is_empty());
        let ready = [ReadyLoraSet {
            model: "tiny".into(),
            set: key,
        }];
        assert_eq!(r.ready_lora_sets(), ready);
        // While the render thread holds the residency (a model loading), the
        // agent still reads the sets as last published, at once.
        let loading = r.lock();
        assert_eq!(r.ready_lora_sets(), ready);
        assert_eq!(Renderer::resident(&r), ["tiny"]);
        drop(loading);
    }

    #[test]
    fn without_a_budget_everything_is_resident_from_the_start() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let models = vec![
            ("a".to_string(), tiny(a.path())),
            ("b".to_string(), tiny(b.path())),
        ];
        let r = CandleRenderer::load(&models, &Device::Cpu).unwrap();
        assert_eq!(r.resident(), ["a", "b"]);
        render(&r, "a").unwrap();
        assert_eq!(r.resident(), ["b", "a"], "use moves a model to the hot end");
        assert_eq!(r.pipelines().len(), 2);
    }

    #[test]
    fn a_model_over_the_whole_budget_fails_the_start() {
        let a = tempfile::tempdir().unwrap();
        let models = vec![("a".to_string(), tiny(a.path()))];
        let e = CandleRenderer::open(&models, &Device::Cpu, Precision::F32, Some(1024))
            .err()
            .expect("over budget");
        assert!(matches!(e, LoadError::OverBudget { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("more than the memory budget of 1.00 KiB"),
            "{e}"
        );
    }

    #[test]
    fn a_pinned_hash_other_than_the_catalogs_is_refused_before_loading() {
        let a = tempfile::tempdir().unwrap();
        let models = vec![("a".to_string(), tiny(a.path()))];
        let one = resident_bytes(a.path()).unwrap();
        let r = CandleRenderer::open(&models, &Device::Cpu, Precision::F32, Some(one)).unwrap();
        let mut task = RenderTask::txt2img(recipe("a"));
        task.recipe.model_hash = "0".repeat(64);
        let e = r.render(&task, &mut |_| true).unwrap_err();
        assert!(e.to_string().contains("the recipe pins"), "{e}");
    }

    #[test]
    fn four_tasks_batched_give_the_pngs_they_give_one_by_one() {
        let a = tempfile::tempdir().unwrap();
        let models = vec![("a".to_string(), tiny(a.path()))];
        let r = CandleRenderer::load(&models, &Device::Cpu).unwrap();
        let tasks: Vec<RenderTask> = [
            ("a (red:1.2) fox", 7, 5.0),
            ("a blue heron at dawn", 8, 7.5),
            ("a [quiet] street, rain", 9, 3.0),
            ("an old lighthouse", 10, 5.0),
        ]
        .into_iter()
        .map(|(prompt, seed, guidance)| {
            let mut recipe = recipe("a");
            recipe.prompt = prompt.into();
            recipe.seed = seed;
            recipe.guidance = guidance;
            RenderTask::txt2img(recipe)
        })
        .collect();
        assert!(
            tasks
                .windows(2)
                .all(|w| w[0].batch_key() == w[1].batch_key())
        );
        let alone: Vec<Vec<u8>> = tasks
            .iter()
            .map(|t| r.render(t, &mut |_| true).unwrap().png)
            .collect();
        let mut steps = vec![0u32; tasks.len()];
        let batched = r.render_batch(&tasks, &mut |i, done| {
            steps[i] = done;
            true
        });
        assert_eq!(steps, [2, 2, 2, 2]);
        for (i, (png, result)) in alone.iter().zip(batched).enumerate() {
            assert_eq!(png, &result.unwrap().png, "task {i}: different PNG bytes");
        }
    }

    #[test]
    fn bad_images_are_bad_input_and_missing_ones_internal() {
        let a = tempfile::tempdir().unwrap();
        let models = vec![("a".to_string(), tiny(a.path()))];
        let r = CandleRenderer::load(&models, &Device::Cpu).unwrap();
        let mut task = RenderTask::txt2img(recipe("a"));
        task.recipe.init_image = Some("0".repeat(64));
        task.recipe.strength = 0.5;
        let e = r.render(&task, &mut |_| true).unwrap_err();
        assert!(matches!(e, RenderError::Internal(_)), "{e}");
        task.init_image = Some(b"not an image".to_vec());
        let e = r.render(&task, &mut |_| true).unwrap_err();
        assert!(
            matches!(&e, RenderError::BadInput(m) if m.contains("init_image")),
            "{e}"
        );
    }

    /// A tiny model `m` with the LoRAs `a` and `b` and the ControlNets `pose`
    /// (diffusers folder) and `edge` (the same weights in the original layout,
    /// so another file and hash).
    struct Extras {
        dir: tempfile::TempDir,
        models: Vec<(String, PathBuf)>,
        assets: Arc<Assets>,
        model_bytes: u64,
    }

    fn extras() -> Extras {
        use kiln_diffusion::{
            LoraFormat, TinyControlNetLayout, TinyKind, write_tiny_controlnet, write_tiny_lora,
        };
        let dir = tempfile::tempdir().unwrap();
        let model = tiny(&dir.path().join("m"));
        let loras = dir.path().join("loras");
        write_tiny_lora(&model, &loras.join("a.safetensors"), LoraFormat::Kohya, 1).unwrap();
        write_tiny_lora(&model, &loras.join("b.safetensors"), LoraFormat::Peft, 2).unwrap();
        let pose = dir.path().join("pose");
        let edge = dir.path().join("edge.safetensors");
        write_tiny_controlnet(&pose, TinyKind::Sd15, TinyControlNetLayout::Diffusers).unwrap();
        write_tiny_controlnet(&edge, TinyKind::Sd15, TinyControlNetLayout::Original).unwrap();
        let controlnets = vec![("pose".to_string(), pose), ("edge".to_string(), edge)];
        let assets = Arc::new(Assets::scan(&[loras], &[], &controlnets).unwrap());
        Extras {
            model_bytes: resident_bytes(&model).unwrap(),
            models: vec![("m".to_string(), model)],
            assets,
            dir,
        }
    }

    impl Extras {
        fn open(&self, budget: Option<u64>) -> CandleRenderer {
            CandleRenderer::open_with(
                &self.models,
                &Device::Cpu,
                Precision::F32,
                budget,
                self.assets.clone(),
            )
            .unwrap()
        }

        /// The PNG a fresh worker renders for `task`.
        fn fresh(&self, task: &RenderTask) -> Vec<u8> {
            self.open(None).render(task, &mut |_| true).unwrap().png
        }
    }

    fn with_lora(name: &str) -> RenderTask {
        let mut r = recipe("m");
        r.extras.loras = vec![kiln_domain::extras::LoraRef {
            name: name.into(),
            hash: String::new(),
            unet_weight: 0.8,
            te_weight: 0.8,
        }];
        RenderTask::txt2img(r)
    }

    fn with_controlnet(name: &str, image: &[u8]) -> RenderTask {
        let mut r = recipe("m");
        r.extras.controlnets = vec![kiln_domain::extras::ControlNetRef {
            model: name.into(),
            hash: String::new(),
            image: "0".repeat(64),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            resize: kiln_domain::extras::ResizeMode::Crop,
            preprocess: None,
        }];
        let mut task = RenderTask::txt2img(r);
        task.controls = vec![image.to_vec()];
        task
    }

    fn parts(r: &CandleRenderer) -> Vec<Part> {
        r.resident_slots()
            .into_iter()
            .filter_map(|s| s.part)
            .collect()
    }

    /// Renders `tasks` in turn under `budget`: each PNG is a fresh worker's, the
    /// resident bytes stay within the budget, and one set of parts is resident
    /// beside the model at a time.
    fn alternate(x: &Extras, budget: u64, part_bytes: u64, tasks: &[&RenderTask]) {
        let r = x.open(Some(budget));
        let mut seen: Vec<Vec<Part>> = Vec::new();
        for (i, task) in tasks.iter().enumerate() {
            let png = r.render(task, &mut |_| true).unwrap().png;
            assert_eq!(png, x.fresh(task), "render {i}: not a fresh worker's bytes");
            assert!(r.resident_bytes() <= budget, "render {i}: over the budget");
            assert_eq!(r.resident_bytes(), x.model_bytes + part_bytes, "render {i}");
            assert_eq!(r.resident(), ["m"]);
            seen.push(parts(&r));
        }
        assert_ne!(seen[0], seen[1], "the second evicted the first");
        assert_eq!(seen[0], seen[2], "the first came back");
        // Without LoRAs or ControlNets: a fresh worker's bytes; the parts stay.
        let plain = RenderTask::txt2img(recipe("m"));
        assert_eq!(
            r.render(&plain, &mut |_| true).unwrap().png,
            x.fresh(&plain)
        );
        assert_eq!(parts(&r), seen[2]);
    }

    #[test]
    fn merged_lora_variants_share_the_memory_budget_with_the_model() {
        let x = extras();
        // What one LoRA set holds (a UNet and a text encoder), on a worker without a budget.
        let unbounded = x.open(None);
        render(&unbounded, "m").unwrap();
        assert_eq!(unbounded.resident_bytes(), x.model_bytes);
        unbounded.render(&with_lora("a"), &mut |_| true).unwrap();
        assert_eq!(parts(&unbounded).len(), 2, "the UNet and the text encoder");
        let set = unbounded.resident_bytes() - x.model_bytes;
        assert!(set > 0);
        unbounded.render(&with_lora("b"), &mut |_| true).unwrap();
        assert_eq!(unbounded.resident_bytes(), x.model_bytes + 2 * set);

        // Room for the model and one set, not two.
        let budget = x.model_bytes + set;
        let (a, b) = (with_lora("a"), with_lora("b"));
        alternate(&x, budget, set, &[&a, &b, &a]);

        // A model and a set over the whole budget: refused, naming the LoRA.
        let small = x.open(Some(x.model_bytes + set / 2));
        let e = small.render(&a, &mut |_| true).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RenderError::Model { .. }), "{text}");
        assert!(
            text.contains("unet merged with LoRA \"a\" 0.8")
                && text.contains("more than the memory budget"),
            "{text}"
        );
        assert!(parts(&small).is_empty() && small.resident() == ["m"]);
        render(&small, "m").unwrap();
    }

    #[test]
    fn controlnets_share_the_memory_budget_with_the_model() {
        let x = extras();
        let image = render(&x.open(None), "m").unwrap().png;
        let (pose, edge) = (
            with_controlnet("pose", &image),
            with_controlnet("edge", &image),
        );
        let unbounded = x.open(None);
        unbounded.render(&pose, &mut |_| true).unwrap();
        let net = unbounded.resident_bytes() - x.model_bytes;
        assert!(net > 0);
        assert_eq!(parts(&unbounded).len(), 1);
        unbounded.render(&edge, &mut |_| true).unwrap();
        assert_eq!(
            unbounded.resident_bytes(),
            x.model_bytes + 2 * net,
            "without a budget every ControlNet stays"
        );

        let budget = x.model_bytes + net;
        alternate(&x, budget, net, &[&pose, &edge, &pose]);

        let small = x.open(Some(x.model_bytes + net / 2));
        let e = small.render(&pose, &mut |_| true).unwrap_err();
        assert!(
            e.to_string().contains("with ControlNet \"pose\" needs"),
            "{e}"
        );
    }

    #[test]
    fn a_batch_whose_parts_do_not_fit_together_renders_one_by_one() {
        let x = extras();
        let unbounded = x.open(None);
        unbounded.render(&with_lora("a"), &mut |_| true).unwrap();
        let set = unbounded.resident_bytes() - x.model_bytes;
        let r = x.open(Some(x.model_bytes + set));
        let tasks = [
            with_lora("a"),
            with_lora("b"),
            RenderTask::txt2img(recipe("m")),
        ];
        let batched = r.render_batch(&tasks, &mut |_, _| true);
        for (task, result) in tasks.iter().zip(batched) {
            assert_eq!(result.unwrap().png, x.fresh(task));
        }
        assert!(r.resident_bytes() <= x.model_bytes + set);
    }

    #[test]
    fn a_model_load_evicts_the_parts_of_the_model_it_replaces() {
        let x = extras();
        let other = x.dir.path().join("other");
        let mut models = x.models.clone();
        models.push(("other".to_string(), tiny(&other)));
        let budget = x.model_bytes * 2;
        let r = CandleRenderer::open_with(
            &models,
            &Device::Cpu,
            Precision::F32,
            Some(budget),
            x.assets.clone(),
        )
        .unwrap();
        assert_eq!(r.resident(), ["m", "other"], "both fit at start");
        r.render(&with_lora("a"), &mut |_| true).unwrap();
        assert_eq!(parts(&r).len(), 2);
        assert_eq!(r.resident(), ["m"], "other made room for the variants");
        render(&r, "other").unwrap();
        assert_eq!(r.resident(), ["other"], "m and its variants made room");
        assert!(parts(&r).is_empty());
        assert_eq!(r.resident_bytes(), x.model_bytes);
        // The agent reports what is resident, not the whole catalog.
        assert_eq!(Renderer::resident(&r), ["other"]);
    }

    #[test]
    fn the_class_names_the_precision() {
        let f32 = determinism_class(&Device::Cpu, Precision::F32);
        let f16 = determinism_class(&Device::Cpu, Precision::F16);
        assert!(
            f32.contains("/f32/") && f16.contains("/f16/"),
            "{f32} {f16}"
        );
        assert_ne!(f32, f16);
        let a = tempfile::tempdir().unwrap();
        let models = vec![("a".to_string(), tiny(a.path()))];
        let r = CandleRenderer::open(&models, &Device::Cpu, Precision::F16, None).unwrap();
        assert_eq!(r.determinism_class(), f16);
        assert_eq!(r.pipelines()["a"].precision(), Precision::F16);
        let shared = CandleRenderer::from_pipelines(r.pipelines(), &Device::Cpu);
        assert_eq!(shared.determinism_class(), f16);
    }

    #[test]
    fn the_class_names_a_vae_tile_and_every_pipeline_decodes_with_it() {
        let a = tempfile::tempdir().unwrap();
        let models = vec![("a".to_string(), tiny(a.path()))];
        let mut r = CandleRenderer::open(&models, &Device::Cpu, Precision::F32, None).unwrap();
        let untiled = r.determinism_class();
        let tile = VaeTile::parse("256").ok();
        r.set_vae_tile(tile);
        assert_eq!(r.determinism_class(), format!("{untiled}/vae-tile-256"));
        assert_eq!(r.pipelines()["a"].vae_tile(), tile);
        let shared = CandleRenderer::from_pipelines(r.pipelines(), &Device::Cpu);
        assert_eq!(shared.determinism_class(), r.determinism_class());
        r.set_vae_tile(None);
        assert_eq!(r.determinism_class(), untiled);
        assert_eq!(r.pipelines()["a"].vae_tile(), None);
    }
}
