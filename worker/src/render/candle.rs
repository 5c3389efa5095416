//! The `candle` renderer: real diffusion on the models of its catalog, loaded
//! on first use and kept resident under an optional memory budget.
//!
//! Every model given with `--model NAME=DIR` is located, hashed and sized when
//! the renderer opens ([`CatalogEntry`]); those that fit the budget are loaded
//! then, so a worker without a budget starts with everything resident, as
//! before. A recipe for a model that is not resident loads it on the render
//! thread, first evicting the least recently used models that must go
//! ([`Residency`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Device;
use kiln_proto::pb::ModelInfo;

use super::{RenderError, RenderTask, Rendered, Renderer};
use crate::catalog::{CatalogEntry, OverBudget, Residency, format_size};
use crate::output::{PIPELINE_VERSION, encode_png};
use crate::pipeline::{Pipeline, PipelineError, model_hash, resident_bytes};

/// Renders with candle pipelines, loading catalog models on demand and
/// keeping them resident under a memory budget.
pub struct CandleRenderer {
    /// Every model this worker can render, by name.
    catalog: BTreeMap<String, CatalogEntry>,
    /// The loaded pipelines. A std mutex is enough: only the render thread
    /// takes it, and never across an `.await`; it is held while a model
    /// loads, since the next render needs that model or the memory it frees.
    resident: Mutex<Residency<Arc<Pipeline>>>,
    /// Where pipelines are loaded.
    device: Device,
    /// The determinism class announced at registration.
    class: String,
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
    /// Loads every `(name, folder)` onto `device` and keeps them all resident.
    ///
    /// # Errors
    /// The first model that fails to load, named with its folder.
    pub fn load(models: &[(String, PathBuf)], device: &Device) -> Result<Self, LoadError> {
        Self::open(models, device, None)
    }

    /// Opens a catalog of `(name, folder)` models on `device` under a memory
    /// budget in bytes (`None`: no limit).
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
        budget: Option<u64>,
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
            let pipeline = load_pipeline(entry, dir, device)?;
            resident
                .insert(name, entry.bytes, Arc::new(pipeline))
                .map_err(|source| LoadError::OverBudget {
                    name: name.clone(),
                    source,
                })?;
        }
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
            device: device.clone(),
            class: determinism_class(device),
        })
    }

    /// Returns a renderer over pipelines already loaded (shared by the
    /// in-process workers of `kiln render`); they stay resident, no budget.
    pub fn from_pipelines(models: BTreeMap<String, Arc<Pipeline>>, device: &Device) -> Self {
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
            let _ = resident.insert(&name, 0, pipeline);
        }
        Self {
            catalog,
            resident: Mutex::new(resident),
            device: device.clone(),
            class: determinism_class(device),
        }
    }

    /// Returns the pipelines resident now, by name.
    pub fn pipelines(&self) -> BTreeMap<String, Arc<Pipeline>> {
        let resident = self.lock();
        resident
            .names()
            .into_iter()
            .filter_map(|n| resident.peek(n).map(|p| (n.to_string(), p)))
            .collect()
    }

    /// Returns the catalog: every model this renderer can render.
    pub fn catalog(&self) -> impl Iterator<Item = &CatalogEntry> {
        self.catalog.values()
    }

    /// Returns the names of the resident models, least recently used first.
    pub fn resident(&self) -> Vec<String> {
        self.lock().names().iter().map(|n| n.to_string()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Residency<Arc<Pipeline>>> {
        // The residency is consistent between calls, so a panic elsewhere leaves it usable.
        self.resident.lock().unwrap_or_else(|e| e.into_inner())
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
            .make_room(entry.bytes)
            .map_err(|e| model_error(e.to_string()))?;
        for (old, _) in &evicted {
            tracing::info!(model = %old, for_model = %name, "model evicted");
        }
        // Free the evicted weights before loading the new ones.
        drop(evicted);
        let pipeline = load_pipeline(entry, dir, &self.device).map_err(|e| {
            let text = e.to_string();
            if text.to_ascii_lowercase().contains("out of memory") {
                RenderError::OutOfMemory(text)
            } else {
                model_error(text)
            }
        })?;
        let pipeline = Arc::new(pipeline);
        resident
            .insert(name, entry.bytes, pipeline.clone())
            .map_err(|e| model_error(e.to_string()))?;
        Ok(pipeline)
    }
}

/// Loads a catalog model and checks that its folder still has the hash the
/// worker announced.
fn load_pipeline(
    entry: &CatalogEntry,
    dir: &std::path::Path,
    device: &Device,
) -> Result<Pipeline, LoadError> {
    let started = Instant::now();
    let pipeline =
        Pipeline::load(dir, device).map_err(|e| LoadError::model(&entry.name, dir, e))?;
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
    tracing::info!(model = %entry.name, dir = %dir.display(), hash = %entry.hash, bytes = %format_size(entry.bytes), ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok(pipeline)
}

/// Returns the class of this machine's candle backend: bytes are only
/// promised equal within one class (CPU kernels differ by instruction set).
pub fn determinism_class(device: &Device) -> String {
    let backend = match device {
        Device::Cpu => {
            let mut features: Vec<&str> = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    features.push("avx512f");
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    features.push("avx2");
                }
                if std::arch::is_x86_feature_detected!("fma") {
                    features.push("fma");
                }
            }
            let mut name = format!("cpu-{}", std::env::consts::ARCH);
            for f in features {
                name.push('+');
                name.push_str(f);
            }
            name
        }
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    };
    format!("candle/{backend}/f32/pipeline-{PIPELINE_VERSION}")
}

/// Why `--device` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Not a device name kiln knows.
    #[error("--device must be cpu, cuda, cuda:N, metal or metal:N, got {0:?}")]
    Unknown(String),
    /// The device's backend was not compiled into this binary.
    #[error(
        "--device {device}: this binary was built without the {feature} feature; \
         rebuild it with `cargo build --release --features {feature}`"
    )]
    NotBuilt {
        /// The device asked for.
        device: String,
        /// The cargo feature that selects its backend.
        feature: &'static str,
    },
    /// The backend is there but the device cannot be opened (no such GPU, no driver).
    #[error("--device {device}: {source}")]
    Unavailable {
        /// The device asked for.
        device: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Opens the device named by `--device`: `cpu`, `cuda` (= `cuda:0`),
/// `cuda:N`, `metal` or `metal:N`. CUDA and Metal need the `cuda` or `metal`
/// cargo feature; without it the error says how to rebuild.
///
/// # Errors
/// [`DeviceError`] naming the device.
pub fn open_device(name: &str) -> Result<Device, DeviceError> {
    let unknown = || DeviceError::Unknown(name.to_string());
    let ordinal = |rest: Option<&str>| match rest {
        None => Ok(0),
        Some(n) => n.parse::<usize>().map_err(|_| unknown()),
    };
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let (backend, rest) = match name.split_once(':') {
        Some((backend, n)) => (backend, Some(n)),
        None => (name, None),
    };
    match backend {
        "cuda" => open_cuda(name, ordinal(rest)?),
        "metal" => open_metal(name, ordinal(rest)?),
        _ => Err(unknown()),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(name: &str, ordinal: usize) -> Result<Device, DeviceError> {
    Device::new_cuda(ordinal).map_err(|source| DeviceError::Unavailable {
        device: name.to_string(),
        source,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(name: &str, _ordinal: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        device: name.to_string(),
        feature: "cuda",
    })
}

#[cfg(feature = "metal")]
fn open_metal(name: &str, ordinal: usize) -> Result<Device, DeviceError> {
    Device::new_metal(ordinal).map_err(|source| DeviceError::Unavailable {
        device: name.to_string(),
        source,
    })
}

#[cfg(not(feature = "metal"))]
fn open_metal(name: &str, _ordinal: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        device: name.to_string(),
        feature: "metal",
    })
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

    fn render(
        &self,
        task: &RenderTask,
        on_step: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Rendered, RenderError> {
        let recipe = &task.recipe;
        if task.init_image.is_some() {
            return Err(RenderError::Internal(
                "img2img is not in this pipeline yet".into(),
            ));
        }
        // The pin is checked against the catalog before anything is loaded.
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
        let pipeline = self.pipeline(&recipe.model)?;
        let started = Instant::now();
        let image = pipeline
            .txt2img(recipe, &mut |done, _total| on_step(done))
            .map_err(|e| match e {
                PipelineError::Cancelled => RenderError::Cancelled,
                other => {
                    let text = other.to_string();
                    if text.to_ascii_lowercase().contains("out of memory") {
                        RenderError::OutOfMemory(text)
                    } else {
                        RenderError::Internal(text)
                    }
                }
            })?;
        let render_ms = started.elapsed().as_millis() as u64;
        let encode_start = Instant::now();
        let png = encode_png(&image, recipe, pipeline.model_hash())
            .map_err(|e| RenderError::Internal(format!("PNG encoding: {e}")))?;
        Ok(Rendered {
            png,
            model_hash: pipeline.model_hash().to_string(),
            render_ms,
            encode_ms: encode_start.elapsed().as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kiln_proto::pb;
    use kiln_proto::recipe::Recipe;

    use super::*;
    use crate::pipeline::write_tiny_model;

    /// A 64 px, 2-step recipe for `model`, built the way the coordinator builds them.
    fn recipe(model: &str) -> Recipe {
        let spec = pb::JobSpec {
            items: vec![pb::RecipeFields {
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
        let mut items = kiln_proto::spec::expand(&spec, 0).expect("valid spec");
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
        let r = CandleRenderer::open(&models, &Device::Cpu, Some(one + one / 2)).unwrap();
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
        let e = CandleRenderer::open(&models, &Device::Cpu, Some(1024))
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
        let r = CandleRenderer::open(&models, &Device::Cpu, Some(one)).unwrap();
        let mut task = RenderTask::txt2img(recipe("a"));
        task.recipe.model_hash = "0".repeat(64);
        let e = r.render(&task, &mut |_| true).unwrap_err();
        assert!(e.to_string().contains("the recipe pins"), "{e}");
    }

    #[test]
    fn devices_parse_and_missing_backends_say_how_to_rebuild() {
        assert!(matches!(open_device("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:x", "cuda:", "tpu:0"] {
            assert!(
                matches!(open_device(bad), Err(DeviceError::Unknown(_))),
                "{bad}"
            );
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = open_device("cuda:1").unwrap_err();
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
        #[cfg(not(feature = "metal"))]
        assert!(matches!(
            open_device("metal"),
            Err(DeviceError::NotBuilt {
                feature: "metal",
                ..
            })
        ));
    }
}
