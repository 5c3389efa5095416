//! The candle diffusion pipeline: loads a Stable Diffusion folder and renders recipes.
//!
//! [`Pipeline::load`] reads a diffusers-layout model folder (architecture from
//! its own config files, weights from safetensors) onto a candle device;
//! [`Pipeline::txt2img`] renders a [`Recipe`] to an [`RgbImage`], reporting
//! each denoising step and stopping when asked. The initial noise comes from
//! [`noise`], kiln's portable counter-based generator, never from the device,
//! so a recipe renders the same image wherever it runs. [`model_hash`] names a
//! model folder by content, and [`write_tiny_model`] writes the small
//! random-weight model that tests and the quickstart render with.
//!
//! Everything here is blocking, compute-bound work: call it from a dedicated
//! thread, never from the async runtime.
//!
//! Files: `layout` (where each file lives), `config` (diffusers configs →
//! candle configs), `weights` (safetensors loading that names bad tensors),
//! `text` (tokenizer, prompt chunking, text encoder), `ddim` (the scheduler),
//! `hash`, `tiny` and `tiny_tokenizer` (the test model).

mod config;
mod ddim;
mod error;
mod hash;
mod inspect;
mod layout;
pub mod noise;
mod text;
mod tiny;
mod tiny_tokenizer;
mod weights;

#[cfg(test)]
mod tests;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use kiln_proto::recipe::Scheduler;

pub use error::PipelineError;
pub use hash::model_hash;
pub use inspect::{PromptTokenizer, resident_bytes};
pub use kiln_proto::recipe::Recipe;
pub use tiny::write_tiny_model;

use ddim::{Ddim, DdimConfig};
use layout::ModelFiles;
use noise::Purpose;
use text::TextEncoder;

/// A model loaded for rendering: tokenizer, text encoder, UNet, VAE, scheduler config.
pub struct Pipeline {
    /// Content hash of the folder it was loaded from.
    hash: String,
    /// Where the weights live and the denoising runs.
    device: Device,
    /// Tokenizer and CLIP text encoder.
    text: TextEncoder,
    /// The denoiser.
    unet: UNet2DConditionModel,
    /// Channels of the latent image (the UNet's input).
    latent_channels: usize,
    /// Latents → pixels (only the decoder is used by txt2img).
    vae: AutoEncoderKL,
    /// Latents are divided by this before decoding (0.18215 for SD 1.x).
    vae_scaling_factor: f64,
    /// Image pixels per latent pixel along each side (8 for SD).
    vae_downscale: usize,
    /// The scheduler's training schedule; a `Ddim` is planned from it per render.
    scheduler: DdimConfig,
}

// The agent moves pipelines between threads and shares them; keep that true.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pipeline>();
};

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("model_hash", &self.hash)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

/// An 8-bit RGB image, rows top to bottom.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes: R, G, B for each pixel, row by row.
    pub pixels: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RgbImage")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("pixels", &format_args!("[{} bytes]", self.pixels.len()))
            .finish()
    }
}

impl Pipeline {
    /// Loads a diffusers-layout model folder onto `device`.
    ///
    /// # Errors
    ///
    /// `Io` for a missing or unreadable file, `Config` for a config that is
    /// malformed or describes an architecture candle cannot run, `Weights` for a
    /// missing or misshapen tensor (naming file and tensor), `Tokenizer` for
    /// unusable tokenizer files.
    pub fn load(dir: &Path, device: &Device) -> Result<Pipeline, PipelineError> {
        let files = ModelFiles::locate(dir)?;
        config::check_model_index(&files.path(layout::MODEL_INDEX))?;
        let scheduler = DdimConfig::read(&files.path(layout::SCHEDULER_CONFIG))?;
        let clip = config::read_clip(&files.path(layout::TEXT_ENCODER_CONFIG))?;
        let unet_path = files.path(layout::UNET_CONFIG);
        let unet_spec = config::read_unet(&unet_path)?;
        let vae_path = files.path(layout::VAE_CONFIG);
        let vae_spec = config::read_vae(&vae_path)?;
        if unet_spec.cross_attention_dim != clip.embed_dim {
            return Err(PipelineError::config(
                unet_path,
                format!(
                    "cross_attention_dim = {} but the text encoder's hidden_size is {}",
                    unet_spec.cross_attention_dim, clip.embed_dim
                ),
            ));
        }
        let latent = vae_spec.config.latent_channels;
        if unet_spec.in_channels != latent || unet_spec.out_channels != latent {
            return Err(PipelineError::config(
                unet_path,
                format!(
                    "in_channels = {} and out_channels = {} must equal the VAE's latent_channels = {latent}",
                    unet_spec.in_channels, unet_spec.out_channels
                ),
            ));
        }
        if vae_spec.out_channels != 3 {
            return Err(PipelineError::config(
                vae_path,
                format!(
                    "out_channels = {}: kiln renders RGB images",
                    vae_spec.out_channels
                ),
            ));
        }

        let text = TextEncoder::load(&files, &clip, device)?;
        let unet = weights::build(&files.path(&files.unet_weights), DType::F32, device, |vb| {
            UNet2DConditionModel::new(
                vb,
                unet_spec.in_channels,
                unet_spec.out_channels,
                false,
                unet_spec.config.clone(),
            )
        })?;
        let vae = weights::build(&files.path(&files.vae_weights), DType::F32, device, |vb| {
            AutoEncoderKL::new(
                vb,
                vae_spec.in_channels,
                vae_spec.out_channels,
                vae_spec.config.clone(),
            )
        })?;
        let hash = model_hash(dir)?;
        tracing::debug!(dir = %dir.display(), %hash, "model loaded");
        Ok(Pipeline {
            hash,
            device: device.clone(),
            text,
            unet,
            latent_channels: latent,
            vae,
            vae_scaling_factor: vae_spec.scaling_factor,
            vae_downscale: vae_spec.downscale,
            scheduler,
        })
    }

    /// Content hash of the model folder (hex sha256), as computed by `model_hash`.
    pub fn model_hash(&self) -> &str {
        &self.hash
    }

    /// Renders a txt2img recipe. `on_step(done, total)` is called after every denoising step;
    /// returning false cancels the render (-> Err(PipelineError::Cancelled)).
    ///
    /// With `guidance > 1` the negative prompt is the unconditional branch of
    /// classifier-free guidance (Ho & Salimans 2022), both branches in one UNet
    /// batch; otherwise only the prompt is used.
    ///
    /// # Errors
    ///
    /// `InvalidRecipe` when a side is not a multiple of the VAE's downscale (8)
    /// or `steps` is out of the scheduler's range, `Cancelled` when `on_step`
    /// returns false, `Tokenizer` or `Candle` when the computation fails.
    pub fn txt2img(
        &self,
        recipe: &Recipe,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<RgbImage, PipelineError> {
        let span = tracing::debug_span!("txt2img", seed = recipe.seed, steps = recipe.steps);
        let _entered = span.enter();
        let latent_width = self.latent_side("width", recipe.width)?;
        let latent_height = self.latent_side("height", recipe.height)?;
        let schedule = match recipe.scheduler {
            Scheduler::Ddim => Ddim::new(&self.scheduler, recipe.steps),
            other => Err(format!("the {other} sampler is not in this pipeline yet")),
        }
        .map_err(|message| PipelineError::InvalidRecipe {
            field: "scheduler",
            message,
        })?;

        let guided = recipe.guidance > 1.0;
        let negative = guided.then_some(recipe.negative_prompt.as_str());
        let context = self.text.encode(&recipe.prompt, negative)?;

        let shape = (1, self.latent_channels, latent_height, latent_width);
        let noise = noise::standard_normal(
            recipe.seed,
            Purpose::InitialLatents,
            0,
            shape.1 * shape.2 * shape.3,
        );
        let mut latents = (Tensor::from_vec(noise, shape, &Device::Cpu)?
            .to_device(&self.device)?
            * schedule.init_noise_sigma())?;

        let total = recipe.steps;
        for (done, &t) in (1..).zip(schedule.timesteps()) {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let prediction = self.unet.forward(&input, t as f64, &context)?;
            let prediction = if guided {
                // Rows are (negative, prompt), as `TextEncoder::encode` batches them.
                let uncond = prediction.i(0..1)?;
                let cond = prediction.i(1..2)?;
                (&uncond + ((cond - &uncond)? * recipe.guidance)?)?
            } else {
                prediction
            };
            latents = schedule.step(&prediction, t, &latents)?;
            if !on_step(done, total) {
                return Err(PipelineError::Cancelled);
            }
        }
        self.decode(&latents)
    }

    /// Returns the latent size of an image side, which must be a multiple of the downscale.
    fn latent_side(&self, field: &'static str, pixels: u32) -> Result<usize, PipelineError> {
        let side = pixels as usize;
        if side == 0 || !side.is_multiple_of(self.vae_downscale) {
            return Err(PipelineError::InvalidRecipe {
                field,
                message: format!(
                    "must be a positive multiple of {} for this model, got {pixels}",
                    self.vae_downscale
                ),
            });
        }
        Ok(side / self.vae_downscale)
    }

    /// Decodes latents to 8-bit RGB: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
    fn decode(&self, latents: &Tensor) -> Result<RgbImage, PipelineError> {
        let image = self.vae.decode(&(latents / self.vae_scaling_factor)?)?;
        let image = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let image = (image * 255.0)?.round()?.to_dtype(DType::U8)?;
        let (_, _, height, width) = image.dims4()?;
        let pixels = image
            .i(0)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<u8>()?;
        Ok(RgbImage {
            width: width as u32,
            height: height as u32,
            pixels,
        })
    }
}
