//! The candle diffusion pipeline: loads a Stable Diffusion folder and renders recipes.
//!
//! [`Pipeline::load`] reads a diffusers-layout model folder (architecture from
//! its own config files, weights from safetensors) onto a candle device;
//! [`Pipeline::txt2img`] renders a [`Recipe`] to an [`RgbImage`], reporting
//! each denoising step and stopping when asked. The initial noise comes from
//! [`noise`], kiln's portable counter-based generator, never from the device,
//! so a recipe renders the same image wherever it runs. [`model_hash`] names a
//! model folder by content, and [`write_tiny_model_kind`] writes the small
//! random-weight models (one per [`TinyKind`]) that tests and the quickstart
//! render with.
//!
//! Architectures: SD 1.x, SD 2.x and SD-Turbo (GELU OpenCLIP text encoder,
//! v-prediction), SDXL and SDXL-Turbo (two text encoders and the UNet's added
//! conditioning), and the inpainting UNets of each (9 input channels), all
//! recognised from the folder's config files. The text encoders (`clip`) and
//! the UNet's top level (`unet`) are kiln's own, because candle's versions
//! cannot run GELU encoders or SDXL's added conditioning; their building blocks
//! and the VAE are candle's.
//!
//! Everything here is blocking, compute-bound work: call it from a dedicated
//! thread, never from the async runtime.
//!
//! Files: `layout` (where each file lives), `config` (diffusers configs →
//! model configs, refusing what kiln cannot run), `weights` (safetensors
//! loading that names bad tensors), `clip` (the CLIP text transformer), `text`
//! (tokenizers, prompt chunking, the text encoders), `unet` (the denoiser),
//! `sampling` (the samplers), `hash`, and `tiny`, `tiny_configs` and
//! `tiny_tokenizer` (the test models).

mod clip;
mod config;
mod error;
mod hash;
mod inspect;
mod layout;
pub mod noise;
mod sampling;
mod text;
mod tiny;
mod tiny_configs;
mod tiny_tokenizer;
mod unet;
mod weights;

#[cfg(test)]
mod arch_tests;
#[cfg(test)]
mod tests;

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;

pub use error::PipelineError;
pub use hash::model_hash;
pub use inspect::{PromptTokenizer, resident_bytes};
pub use kiln_proto::recipe::Recipe;
pub use tiny::{ParseTinyKindError, TinyKind, write_tiny_model, write_tiny_model_kind};

use layout::ModelFiles;
use noise::Purpose;
use sampling::SchedulerConfig;
use text::TextEncoders;
use unet::{AddedConditioning, Conditioning, Unet};

/// A model loaded for rendering: tokenizers, text encoders, UNet, VAE, scheduler config.
pub struct Pipeline {
    /// Content hash of the folder it was loaded from.
    hash: String,
    /// Where the weights live and the denoising runs.
    device: Device,
    /// Tokenizers and CLIP text encoders (two for SDXL).
    text: TextEncoders,
    /// The denoiser: kiln's UNet top level, which also runs SDXL's added conditioning.
    unet: Unet,
    /// Whether the UNet also takes a mask and masked-image latents (`in_channels = 9`).
    inpainting: bool,
    /// Channels of the latent image (the VAE's latents; the UNet's output).
    latent_channels: usize,
    /// Latents → pixels (only the decoder is used by txt2img).
    vae: AutoEncoderKL,
    /// Latents are divided by this before decoding (0.18215 for SD 1.x).
    vae_scaling_factor: f64,
    /// Image pixels per latent pixel along each side (8 for SD).
    vae_downscale: usize,
    /// The scheduler's training schedule; a sampler is planned from it per render.
    scheduler: SchedulerConfig,
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
    /// The architecture (SD 1.x, SD 2.x / SD-Turbo, SDXL / SDXL-Turbo, and their
    /// inpainting UNets) comes from the folder's config files; weights may be f32 or
    /// f16 (`*.fp16.safetensors`) and are loaded as f32.
    ///
    /// # Errors
    ///
    /// `Io` for a missing or unreadable file, `Config` for a config that is
    /// malformed or describes an architecture candle cannot run, `Weights` for a
    /// missing or misshapen tensor (naming file and tensor), `Tokenizer` for
    /// unusable tokenizer files.
    pub fn load(dir: &Path, device: &Device) -> Result<Pipeline, PipelineError> {
        let files = ModelFiles::locate(dir)?;
        let spec = config::read_model(&files)?;
        let scheduler = SchedulerConfig::read(&files.path(layout::SCHEDULER_CONFIG))?;
        let text = TextEncoders::load(&files, &spec.text, spec.zero_empty_negative, device)?;
        let unet = weights::build(&files.path(&files.unet_weights), DType::F32, device, |vb| {
            Unet::new(vb, &spec.unet)
        })?;
        let vae_spec = &spec.vae;
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
            inpainting: spec.inpainting,
            latent_channels: vae_spec.config.latent_channels,
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

    /// Whether the UNet is an inpainting one: it takes a mask and the masked image's
    /// latents beside the noisy latents (`in_channels = 2 × latent channels + 1`).
    pub fn is_inpainting(&self) -> bool {
        self.inpainting
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
    /// `InvalidRecipe` when a side is not a multiple of the VAE's downscale (8),
    /// `steps` is out of the scheduler's range or `karras`/`eta` do not fit the
    /// scheduler, `Cancelled` when `on_step` returns false, `Tokenizer` or
    /// `Candle` when the computation fails.
    pub fn txt2img(
        &self,
        recipe: &Recipe,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<RgbImage, PipelineError> {
        let span = tracing::debug_span!("txt2img", seed = recipe.seed, steps = recipe.steps);
        let _entered = span.enter();
        let latent_width = self.latent_side("width", recipe.width)?;
        let latent_height = self.latent_side("height", recipe.height)?;
        let mut sampler = sampling::for_recipe(&self.scheduler, recipe)?;

        let guided = recipe.guidance > 1.0;
        let negative = guided.then_some(recipe.negative_prompt.as_str());
        let context = self.conditioning(&recipe.prompt, negative, latent_height, latent_width)?;

        let shape = (1, self.latent_channels, latent_height, latent_width);
        let len = shape.1 * shape.2 * shape.3;
        let noise = noise::standard_normal(recipe.seed, Purpose::InitialLatents, 0, len);
        let mut latents = (Tensor::from_vec(noise, shape, &Device::Cpu)?
            .to_device(&self.device)?
            * sampler.init_noise_sigma())?;
        // Fresh noise of ancestral steps, keyed by (seed, step index): never the device RNG.
        let step_noise = |step: u32| {
            let values = noise::standard_normal(recipe.seed, Purpose::AncestralStep, step, len);
            Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(&self.device)
        };

        let total = recipe.steps;
        let timesteps = sampler.timesteps().to_vec();
        for ((i, &t), done) in timesteps.iter().enumerate().zip(1..) {
            let scaled = sampler.scale_model_input(&latents, i)?;
            let input = if guided {
                Tensor::cat(&[&scaled, &scaled], 0)?
            } else {
                scaled
            };
            let prediction = self.unet.forward(&input, t, &context)?;
            let prediction = if guided {
                // Rows are (negative, prompt), as `TextEncoder::encode` batches them.
                let uncond = prediction.i(0..1)?;
                let cond = prediction.i(1..2)?;
                (&uncond + ((cond - &uncond)? * recipe.guidance)?)?
            } else {
                prediction
            };
            latents = sampler.step(&prediction, i, &latents, &step_noise)?;
            if !on_step(done, total) {
                return Err(PipelineError::Cancelled);
            }
        }
        self.decode(&latents)
    }

    /// Returns the UNet conditioning of one render: text states for the guidance
    /// branches (rows ordered negative, prompt), SDXL's added conditioning, and the
    /// image inputs of an inpainting UNet.
    ///
    /// SDXL's time ids are diffusers' defaults: original size = target size = the
    /// image's (height, width), crop top-left (0, 0). An inpainting UNet rendering
    /// txt2img gets a mask of ones (repaint everything) and zero masked-image latents.
    fn conditioning(
        &self,
        prompt: &str,
        negative: Option<&str>,
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Conditioning, PipelineError> {
        let text = self.text.encode(prompt, negative)?;
        let rows = text.context.dim(0)?;
        let added = match text.pooled {
            Some(text_embeds) => {
                let h = (latent_height * self.vae_downscale) as f32;
                let w = (latent_width * self.vae_downscale) as f32;
                let ids: Vec<f32> = (0..rows).flat_map(|_| [h, w, 0.0, 0.0, h, w]).collect();
                let time_ids = Tensor::from_vec(ids, (rows, config::SDXL_TIME_IDS), &self.device)?;
                Some(AddedConditioning {
                    text_embeds,
                    time_ids,
                })
            }
            None => None,
        };
        let image = if self.inpainting {
            let size = (latent_height, latent_width);
            let mask = Tensor::ones((rows, 1, size.0, size.1), DType::F32, &self.device)?;
            let masked = Tensor::zeros(
                (rows, self.latent_channels, size.0, size.1),
                DType::F32,
                &self.device,
            )?;
            Some(Tensor::cat(&[&mask, &masked], 1)?)
        } else {
            None
        };
        Ok(Conditioning {
            context: text.context,
            added,
            image,
        })
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
