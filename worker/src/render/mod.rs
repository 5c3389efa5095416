//! Renderers turn a recipe into a PNG. They run on the render thread, never
//! on the async runtime.
//!
//! The render thread hands a renderer the tasks that were queued together and
//! share a [`BatchKey`] as one [`Renderer::render_batch`] call; the candle
//! renderer denoises them as one UNet batch, other renderers one by one.

mod candle;
mod sim;

use std::path::PathBuf;
use std::sync::Arc;

use kiln_domain::lora_set::ReadyLoraSet;
use kiln_domain::recipe::{BatchKey, Recipe, check_model_name};
use kiln_proto::error::{FieldError, quote};

pub use self::candle::{CandleRenderer, LoadError};
pub use kiln_diffusion::{Assets, DeviceError, PreviewSink, determinism_class, open_device};

/// Parses `--model NAME=DIR` arguments into (name, folder) pairs.
///
/// # Errors
/// The first argument without `=` or with an invalid name, naming `--model`.
pub fn parse_model_args(args: &[String]) -> Result<Vec<(String, PathBuf)>, FieldError> {
    args.iter()
        .map(|m| {
            let (name, dir) = m.split_once('=').ok_or_else(|| {
                FieldError::new("--model", format!("must be NAME=DIR, got {}", quote(m)))
            })?;
            check_model_name("--model", name)?;
            Ok((name.to_string(), PathBuf::from(dir)))
        })
        .collect()
}
pub use self::sim::{DEFAULT_LORA_SLOTS, SimOptions, SimRenderer, parse_ready_set};

/// Parses `--controlnet NAME=PATH` arguments into (name, path) pairs.
///
/// # Errors
/// The first argument without `=` or with an invalid name, naming `--controlnet`.
pub fn parse_controlnet_args(args: &[String]) -> Result<Vec<(String, PathBuf)>, FieldError> {
    args.iter()
        .map(|m| {
            let (name, path) = m.split_once('=').ok_or_else(|| {
                FieldError::new(
                    "--controlnet",
                    format!("must be NAME=PATH, got {}", quote(m)),
                )
            })?;
            check_model_name("--controlnet", name)?;
            Ok((name.to_string(), PathBuf::from(path)))
        })
        .collect()
}

/// One task to render: its recipe and the image bytes the recipe refers to.
#[derive(Clone, Debug)]
pub struct RenderTask {
    /// What to render.
    pub recipe: Recipe,
    /// The init image (PNG or JPEG), when the recipe has one.
    pub init_image: Option<Vec<u8>>,
    /// The inpainting mask (PNG or JPEG), when the recipe has one.
    pub mask: Option<Vec<u8>>,
    /// The control images (PNG or JPEG), one per ControlNet of the recipe, in order.
    pub controls: Vec<Vec<u8>>,
    /// The task's `render` span (in its job's trace), entered by the render
    /// thread while the task renders alone: the engine's spans become its children.
    pub span: tracing::Span,
}

impl RenderTask {
    /// Returns a txt2img task.
    pub fn txt2img(recipe: Recipe) -> Self {
        Self {
            recipe,
            init_image: None,
            mask: None,
            controls: Vec::new(),
            span: tracing::Span::none(),
        }
    }

    /// Returns what must be equal for this task to be rendered in one batch with
    /// others: its recipe's [`BatchKey`], the one key the coordinator fills a
    /// worker's slots by. A recipe names its init image and mask, so the key's
    /// mode is the task's.
    pub fn batch_key(&self) -> BatchKey {
        self.recipe.batch_key()
    }
}

/// Says which LoRA, embedding or ControlNet of `extras` this worker does not
/// hold with the hash the recipe names (an empty hash: any), or `None`.
pub fn missing_asset(assets: &Assets, extras: &kiln_domain::extras::Extras) -> Option<String> {
    let wanted = extras
        .loras
        .iter()
        .map(|l| ("LoRA", &assets.loras, &l.name, &l.hash))
        .chain(
            extras
                .embeddings
                .iter()
                .map(|e| ("embedding", &assets.embeddings, &e.name, &e.hash)),
        )
        .chain(
            extras
                .controlnets
                .iter()
                .map(|c| ("ControlNet", &assets.controlnets, &c.model, &c.hash)),
        );
    for (kind, held, name, hash) in wanted {
        match held.get(name) {
            None => return Some(format!("this worker has no {kind} {name}")),
            Some(file) if !hash.is_empty() && file.hash != *hash => {
                return Some(format!(
                    "this worker holds {kind} {name} with hash {}, the recipe pins {hash}",
                    file.hash
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// An encoded image and where the time went.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The PNG bytes, metadata chunks included.
    pub png: Vec<u8>,
    /// Hash of the model that made it.
    pub model_hash: String,
    /// Denoising and decoding time; for a task rendered in a batch, the whole batch's.
    pub render_ms: u64,
    /// PNG encoding time.
    pub encode_ms: u64,
}

/// Why a render produced no image.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// `on_step` asked to stop.
    #[error("render cancelled")]
    Cancelled,
    /// The recipe cannot be rendered anywhere.
    #[error("bad input: {0}")]
    BadInput(String),
    /// This worker cannot render with the model (missing, wrong hash, load failure).
    #[error("model {model:?}: {message}")]
    Model {
        /// The recipe's model name.
        model: String,
        /// What is wrong.
        message: String,
    },
    /// The device ran out of memory.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Anything else; another worker may succeed.
    #[error("{0}")]
    Internal(String),
}

/// A model a renderer holds, as it announces it: the catalog name and the
/// content hash that pins what the name means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    /// Catalog name.
    pub name: String,
    /// Content hash of the model's files, hex.
    pub hash: String,
}

/// Turns recipes into PNG images.
pub trait Renderer: Send + Sync + 'static {
    /// Returns the models this renderer holds, announced at registration.
    fn models(&self) -> Vec<ModelInfo>;

    /// Returns the determinism class: workers of one class render equal bytes.
    fn determinism_class(&self) -> String;

    /// Returns the LoRAs, embeddings and ControlNets this renderer can apply,
    /// announced at registration with their hashes; by default none.
    fn assets(&self) -> Arc<Assets> {
        Arc::default()
    }

    /// Returns the models loaded right now, so the scheduler can keep this
    /// worker on them; by default every model is resident. The agent asks
    /// from its async tasks while the render thread may be loading a model,
    /// so this answers at once: it never waits for a load to end.
    fn resident(&self) -> Vec<String> {
        self.models().into_iter().map(|m| m.name).collect()
    }

    /// Returns the LoRA sets this renderer holds ready (merged and kept) for
    /// each model, so the scheduler can send it tasks that need no merge;
    /// by default none.
    fn ready_lora_sets(&self) -> Vec<ReadyLoraSet> {
        Vec::new()
    }

    /// Renders one recipe. `on_step(done)` is called after every denoising
    /// step; when it returns false the render stops with `Cancelled`.
    fn render(
        &self,
        task: &RenderTask,
        on_step: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Rendered, RenderError>;

    /// Renders several tasks, results in the order of `tasks`. `on_step(i, done)`
    /// reports task `i`; returning false cancels that task alone.
    ///
    /// Every result must be what [`Renderer::render`] gives for the task alone, byte
    /// for byte. The default renders the tasks one by one.
    fn render_batch(
        &self,
        tasks: &[RenderTask],
        on_step: &mut dyn FnMut(usize, u32) -> bool,
    ) -> Vec<Result<Rendered, RenderError>> {
        tasks
            .iter()
            .enumerate()
            .map(|(i, task)| self.render(task, &mut |done| on_step(i, done)))
            .collect()
    }

    /// Renders as [`Renderer::render_batch`] does, the same bytes, and hands
    /// `previews` a live preview of task `i` every `previews.every` steps
    /// ([`kiln_domain::preview`]: 64 px wide PNG). By default it sends none.
    fn render_batch_with_previews(
        &self,
        tasks: &[RenderTask],
        on_step: &mut dyn FnMut(usize, u32) -> bool,
        previews: &mut PreviewSink<'_>,
    ) -> Vec<Result<Rendered, RenderError>> {
        let _ = previews;
        self.render_batch(tasks, on_step)
    }
}
