//! The `candle` renderer: real diffusion on the models it holds resident.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use kiln_proto::pb::ModelInfo;

use super::{RenderError, RenderTask, Rendered, Renderer};
use crate::output::{PIPELINE_VERSION, encode_png};
use crate::pipeline::{Pipeline, PipelineError};

/// Renders with candle pipelines loaded once and kept in memory.
pub struct CandleRenderer {
    models: BTreeMap<String, Arc<Pipeline>>,
    class: String,
}

/// A model that failed to load, with its name and folder.
#[derive(Debug, thiserror::Error)]
#[error("model {name:?} from {dir}: {source}")]
pub struct LoadError {
    /// Catalog name.
    pub name: String,
    /// The folder given.
    pub dir: String,
    /// What went wrong (boxed: pipeline errors are large).
    pub source: Box<PipelineError>,
}

impl CandleRenderer {
    /// Loads every `(name, folder)` onto `device`.
    ///
    /// # Errors
    /// The first model that fails to load, named with its folder.
    pub fn load(models: &[(String, PathBuf)], device: &Device) -> Result<Self, LoadError> {
        let mut loaded = BTreeMap::new();
        for (name, dir) in models {
            let started = Instant::now();
            let pipeline = Pipeline::load(dir, device).map_err(|source| LoadError {
                name: name.clone(),
                dir: dir.display().to_string(),
                source: Box::new(source),
            })?;
            tracing::info!(model = %name, dir = %dir.display(), hash = %pipeline.model_hash(), ms = started.elapsed().as_millis() as u64, "model loaded");
            loaded.insert(name.clone(), Arc::new(pipeline));
        }
        Ok(Self::from_pipelines(loaded, device))
    }

    /// Returns a renderer over pipelines already loaded (shared by the
    /// in-process workers of `kiln render`).
    pub fn from_pipelines(models: BTreeMap<String, Arc<Pipeline>>, device: &Device) -> Self {
        Self {
            models,
            class: determinism_class(device),
        }
    }

    /// Returns the loaded pipelines by name.
    pub fn pipelines(&self) -> &BTreeMap<String, Arc<Pipeline>> {
        &self.models
    }
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

impl Renderer for CandleRenderer {
    fn models(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|(name, p)| ModelInfo {
                name: name.clone(),
                hash: p.model_hash().to_string(),
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
        let pipeline = self
            .models
            .get(&recipe.model)
            .ok_or_else(|| RenderError::Model {
                model: recipe.model.clone(),
                message: "not loaded on this worker".into(),
            })?;
        if !recipe.model_hash.is_empty() && recipe.model_hash != pipeline.model_hash() {
            return Err(RenderError::Model {
                model: recipe.model.clone(),
                message: format!(
                    "this worker holds hash {}, the recipe pins {}",
                    pipeline.model_hash(),
                    recipe.model_hash
                ),
            });
        }
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
