//! kiln's diffusion engine on candle: loads a Stable Diffusion folder and
//! renders recipes to images.
//!
//! This crate is one box of kiln's architecture: it may import candle,
//! tokenizers, image codecs and `kiln-domain` (for [`Recipe`] and the prompt
//! syntax); never tonic, prost, tokio or redis, so any Rust program can embed
//! it. Its inputs are kiln's own types ([`RenderInput`] over a [`Recipe`]) and
//! its outputs images plus timings; the worker's agent, the CLI's tools and
//! the tests all go through this API.
//!
//! [`Pipeline::load`] / [`Pipeline::load_with`] read a diffusers-layout model
//! folder (architecture from its own config files, weights from safetensors)
//! onto a candle device in a [`Precision`]; [`Pipeline::render`] renders a
//! [`RenderInput`] (a [`Recipe`] and, for img2img and inpainting, the init
//! image and mask bytes) to an [`RgbImage`], reporting each denoising step and
//! stopping when asked; [`Pipeline::render_batch`] renders several, sharing UNet
//! batches where it can, each with the bytes it gets alone. All noise (initial
//! latents, ancestral steps, img2img) comes from [`noise`], kiln's portable
//! counter-based generator, never from the device, so a recipe renders the same
//! image wherever it runs. [`model_hash`] names a model folder by content, and
//! [`write_tiny_model_kind`] writes the small random-weight models (one per
//! [`TinyKind`]) that tests and the quickstart render with.
//!
//! Architectures: SD 1.x, SD 2.x and SD-Turbo (GELU OpenCLIP text encoder,
//! v-prediction), SDXL and SDXL-Turbo (two text encoders and the UNet's added
//! conditioning), and the inpainting UNets of each (9 input channels), all
//! recognised from the folder's config files. The text encoders (`clip`), the
//! UNet's top level and ResNet blocks (`unet`, `unet_blocks`) and the VAE's top
//! level (`vae`) are kiln's own, because candle's versions cannot run GELU
//! encoders or SDXL's added conditioning, cannot batch tasks exactly, and hide
//! the VAE's latent mean; their building blocks are candle's.
//!
//! Everything here is blocking, compute-bound work: call it from a dedicated
//! thread, never from the async runtime.
//!
//! Files: `layout` (where each file lives), `config` (diffusers configs →
//! model configs, refusing what kiln cannot run), `weights` (safetensors
//! loading that names bad tensors), `clip` (the CLIP text transformer), `text`
//! and `text_cache` (prompt weighting, chunking, the text encoders and their
//! cache), `unet` and `unet_blocks` (the denoiser), `vae`, `images` (init images
//! and masks), `render` (the denoising loop, batching), `sampling` (the
//! samplers), `parts` (merged LoRA variants and ControlNets as an owner
//! budgets them), `precision`, `hash`, `device` (devices and the determinism
//! class), `output` (PNG encoding with metadata chunks, `PIPELINE_VERSION`),
//! `bench` (the timings of `kiln bench pipeline`), and `tiny`, `tiny_configs`
//! and `tiny_tokenizer` (the test models).
#![warn(missing_docs)]

mod adapters;
/// The C allocator's settings for a process that renders.
pub mod allocator;
mod assets;
mod attend;
pub mod bench;
mod clip;
mod conditioning;
mod config;
mod controlnet;
mod conv;
/// Devices the engine runs on, and the determinism class of a device and precision.
pub mod device;
mod embeddings;
mod error;
mod geglu;
mod group_norm;
mod hash;
mod images;
mod inspect;
mod layout;
mod linear;
mod lora;
pub mod noise;
mod operand;
/// PNG encoding with the A1111 `parameters` and the `kiln` chunks.
pub mod output;
mod parts;
mod precision;
/// Weight-free control-image preprocessors (canny, scribble, lineart) and control-image fitting.
pub mod preprocess;
mod preview;
mod product;
mod render;
mod sampling;
mod text;
mod text_cache;
mod text_extras;
mod tiny;
mod tiny_configs;
mod tiny_tokenizer;
mod transformer;
mod unet;
mod unet_blocks;
mod vae;
mod vae_blocks;
mod vae_tiles;
mod weights;
mod winograd;

#[cfg(test)]
mod arch_tests;
#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod editing_tests;
#[cfg(test)]
mod golden_tests;
#[cfg(test)]
mod img2img_tests;
#[cfg(test)]
mod lora_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod text_tests;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};

pub use assets::{AssetFile, Assets, file_hash};
pub use controlnet::{TinyControlNetLayout, write_tiny_controlnet};
pub use device::{DeviceError, determinism_class, open_device};
pub use embeddings::write_tiny_embedding;
pub use error::PipelineError;
pub use hash::model_hash;
pub use inspect::{PromptTokenizer, resident_bytes};
pub use kiln_domain::recipe::Recipe;
pub use lora::{LoraFormat, ParseLoraFormatError, write_tiny_lora};
pub use parts::{Needed, Part};
pub use precision::{ParsePrecisionError, Precision};
pub use preview::PreviewSink;
pub use render::{RenderInput, RenderTimings, Rendered};
pub use tiny::{ParseTinyKindError, TinyKind, write_tiny_model, write_tiny_model_kind};
pub use vae_tiles::{VaeTile, VaeTileError};

use layout::ModelFiles;
use sampling::SchedulerConfig;
use text::TextEncoders;
use unet::{Conditioning, Unet, UnetConfig};
use vae::Vae;

/// A model loaded for rendering: tokenizers, text encoders, UNet, VAE, scheduler config.
pub struct Pipeline {
    /// Content hash of the folder it was loaded from.
    hash: String,
    /// Where the weights live and the denoising runs.
    device: Device,
    /// The dtype of the text encoders' and the UNet's weights and arithmetic.
    precision: Precision,
    /// Tokenizers and CLIP text encoders (two for SDXL), with their embedding cache.
    text: TextEncoders,
    /// The denoiser: kiln's UNet top level, which also runs SDXL's added conditioning.
    /// Shared with the renders that use it; never changed (LoRAs merge into variants).
    unet: Arc<Unet>,
    /// The UNet and text encoders merged with LoRA sets, under a memory budget.
    variants: lora::variants::Variants,
    /// The UNet's architecture: ControlNets are built against it.
    unet_config: UnetConfig,
    /// The ControlNets recipes used so far, loaded on first use.
    controlnets: controlnet::ControlNets,
    /// Whether the UNet also takes a mask and masked-image latents (`in_channels = 9`).
    inpainting: bool,
    /// Channels of the latent image (the VAE's latents; the UNet's output).
    latent_channels: usize,
    /// Pixels ↔ latents.
    vae: Vae,
    /// The VAE's dtype: the precision's, or f32 when its config asks for `force_upcast`.
    vae_dtype: DType,
    /// Latents are divided by this before decoding (0.18215 for SD 1.x).
    vae_scaling_factor: f64,
    /// Image pixels per latent pixel along each side (8 for SD).
    vae_downscale: usize,
    /// Decoded tile side in pixels (`--vae-tile`; 0: untiled), set on a shared
    /// pipeline by its owner ([`Pipeline::set_vae_tile`]).
    vae_tile: std::sync::atomic::AtomicU32,
    /// The scheduler's training schedule; a sampler is planned from it per render.
    scheduler: SchedulerConfig,
    /// The LoRAs, embeddings and ControlNets recipes may name (none until
    /// [`Pipeline::set_assets`]).
    assets: Arc<Assets>,
    /// The family's latent-to-RGB projection for live previews (`None`: no previews).
    preview: Option<preview::LatentRgb>,
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
            .field("precision", &self.precision)
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
    /// Loads a diffusers-layout model folder onto `device` in f32.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::load_with`].
    pub fn load(dir: &Path, device: &Device) -> Result<Pipeline, PipelineError> {
        Self::load_with(dir, device, Precision::F32)
    }

    /// Loads a diffusers-layout model folder onto `device` in `precision`.
    ///
    /// The architecture (SD 1.x, SD 2.x / SD-Turbo, SDXL / SDXL-Turbo, and their
    /// inpainting UNets) comes from the folder's config files; weights may be f32 or
    /// f16 (`*.fp16.safetensors`) and are converted to `precision` (the VAE stays f32
    /// when its config sets `force_upcast`).
    ///
    /// # Errors
    ///
    /// `Io` for a missing or unreadable file, `Config` for a config that is
    /// malformed or describes an architecture candle cannot run, `Weights` for a
    /// missing or misshapen tensor (naming file and tensor), `Tokenizer` for
    /// unusable tokenizer files.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        precision: Precision,
    ) -> Result<Pipeline, PipelineError> {
        let dtype = precision.dtype();
        let files = ModelFiles::locate(dir)?;
        let spec = config::read_model(&files)?;
        let scheduler = SchedulerConfig::read(&files.path(layout::SCHEDULER_CONFIG))?;
        let text = TextEncoders::load(&files, &spec.text, spec.zero_empty_negative, device, dtype)?;
        let unet = weights::build(&files.path(&files.unet_weights), dtype, device, |vb| {
            Unet::new(vb, &spec.unet)
        })?;
        let variants = lora::variants::Variants::new(
            (files.path(&files.unet_weights), spec.unet.clone()),
            files
                .text
                .iter()
                .zip(&spec.text)
                .map(|(t, s)| (files.path(&t.weights), s.config.clone()))
                .collect(),
            dtype,
            device,
        )?;
        let vae_spec = &spec.vae;
        let vae_dtype = if vae_spec.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae = weights::build(&files.path(&files.vae_weights), vae_dtype, device, |vb| {
            Vae::new(vb, vae_spec)
        })?;
        let hash = model_hash(dir)?;
        tracing::debug!(dir = %dir.display(), %hash, %precision, "model loaded");
        Ok(Pipeline {
            hash,
            device: device.clone(),
            precision,
            text,
            unet: Arc::new(unet),
            variants,
            unet_config: spec.unet.clone(),
            controlnets: controlnet::ControlNets::default(),
            inpainting: spec.inpainting,
            latent_channels: vae_spec.config.latent_channels,
            vae,
            vae_dtype,
            vae_scaling_factor: vae_spec.scaling_factor,
            vae_downscale: vae_spec.downscale,
            vae_tile: std::sync::atomic::AtomicU32::new(0),
            scheduler,
            assets: Arc::new(Assets::default()),
            preview: preview::LatentRgb::for_family(
                spec.text.len() == 2,
                vae_spec.config.latent_channels,
            ),
        })
    }

    /// Decodes latents larger than `tile` tile by tile from now on (`None`: untiled),
    /// as [`vae_tiles`] describes; images no larger than a tile keep their bytes.
    pub fn set_vae_tile(&self, tile: Option<VaeTile>) {
        let px = tile.map_or(0, VaeTile::pixels);
        self.vae_tile
            .store(px, std::sync::atomic::Ordering::Relaxed);
    }

    /// The tile size decoding uses, if tiled ([`Pipeline::set_vae_tile`]).
    pub fn vae_tile(&self) -> Option<VaeTile> {
        match self.vae_tile.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            px => VaeTile::parse(&px.to_string()).ok(),
        }
    }

    /// Gives the pipeline the LoRAs, embeddings and ControlNets recipes may name.
    pub fn set_assets(&mut self, assets: Arc<Assets>) {
        self.assets = assets;
    }

    /// The LoRAs, embeddings and ControlNets recipes may name.
    pub fn assets(&self) -> &Assets {
        &self.assets
    }

    /// Sets the most memory the UNets and text encoders merged with LoRAs may keep
    /// (by default twice the base model's UNet and text encoders); 0 keeps none, so
    /// every render with LoRAs merges again; `u64::MAX` evicts none, for an owner
    /// that drops them itself ([`Pipeline::drop_part`]). Drops the variants kept so far.
    pub fn set_lora_budget(&mut self, bytes: u64) {
        self.variants.set_budget(bytes);
    }

    /// Returns how many LoRA-merged UNets and text encoders are kept, and their bytes.
    pub fn lora_variants(&self) -> (usize, u64) {
        self.variants.resident()
    }

    /// Returns the LoRA sets this pipeline holds ready, most recently used first:
    /// sets a render applied whose merged UNet and text encoders are all still
    /// kept, so another render with the set merges nothing. Each is its
    /// [`kiln_domain::lora_set::LoraSet::key`]; the worker reports them with
    /// every lease, and the coordinator prefers tasks with these sets.
    pub fn ready_lora_sets(&self) -> Vec<String> {
        self.variants.ready()
    }

    /// Returns what the pipeline holds beyond its base model (merged LoRA
    /// variants, ControlNets), each with its bytes, measured as [`resident_bytes`]
    /// measures models.
    pub fn parts(&self) -> Vec<(Part, u64)> {
        parts::held(self)
    }

    /// Returns the parts rendering `inputs` will hold while it runs (held now or
    /// built by the render), each once, with its bytes and a name for people.
    /// Reads file headers only; LoRAs or ControlNets the pipeline cannot resolve
    /// are left out (the render refuses them).
    pub fn parts_needed(&self, inputs: &[RenderInput<'_>]) -> Vec<Needed> {
        parts::needed(self, inputs)
    }

    /// Drops a part the pipeline holds; returns whether it held it. A render
    /// under way keeps what it uses until it ends; a later one builds it again.
    pub fn drop_part(&self, part: &Part) -> bool {
        parts::remove(self, part)
    }

    /// Content hash of the model folder (hex sha256), as computed by `model_hash`.
    pub fn model_hash(&self) -> &str {
        &self.hash
    }

    /// The precision the model was loaded in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether the UNet is an inpainting one: it takes a mask and the masked image's
    /// latents beside the noisy latents (`in_channels = 2 × latent channels + 1`).
    pub fn is_inpainting(&self) -> bool {
        self.inpainting
    }

    /// Renders a txt2img recipe: [`Pipeline::render`] without images.
    ///
    /// # Errors
    ///
    /// As [`Pipeline::render`].
    pub fn txt2img(
        &self,
        recipe: &Recipe,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<RgbImage, PipelineError> {
        self.render(&RenderInput::txt2img(recipe), on_step)
    }

    /// Renders one recipe: txt2img, img2img (an init image) or inpainting (an init
    /// image and a mask), returning the image alone ([`Pipeline::render_batch`]
    /// also returns where the time went). `on_step(done, total)` is called after every denoising
    /// step, `done` counting the steps an img2img start skips; returning false
    /// cancels the render (-> Err(PipelineError::Cancelled)).
    ///
    /// With `guidance > 1` the negative prompt is the unconditional branch of
    /// classifier-free guidance (Ho & Salimans 2022), both branches in one UNet
    /// batch; otherwise only the prompt is used. How init images and masks are used
    /// is described in the `render` module.
    ///
    /// # Errors
    ///
    /// `InvalidRecipe` when a side is not a multiple of the VAE's downscale (8),
    /// `steps` is out of the scheduler's range, `karras`/`eta` do not fit the
    /// scheduler, a prompt has a malformed weight, or an init image or mask cannot be
    /// used (naming `init_image` or `mask`); `Cancelled` when `on_step` returns false;
    /// `Tokenizer` or `Candle` when the computation fails.
    pub fn render(
        &self,
        input: &RenderInput<'_>,
        on_step: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<RgbImage, PipelineError> {
        let mut results = self.render_batch(std::slice::from_ref(input), &mut |_, done, total| {
            on_step(done, total)
        });
        results
            .pop()
            .unwrap_or(Err(PipelineError::Cancelled))
            .map(|r| r.image)
    }

    /// Renders several recipes, denoising together those that can share UNet
    /// batches; each result is byte-identical to rendering its input alone.
    ///
    /// Inputs with the same size, schedule (sampler, steps, Karras, start step),
    /// guidance on or off and prompt length in chunks run as one UNet batch, each
    /// keeping its own noise, conditioning, sampler and guidance scale.
    /// `on_step(index, done, total)` reports input `index`; returning false cancels
    /// that input alone. Results are in the order of `inputs`, each with its
    /// [`RenderTimings`].
    pub fn render_batch(
        &self,
        inputs: &[RenderInput<'_>],
        on_step: &mut dyn FnMut(usize, u32, u32) -> bool,
    ) -> Vec<Result<Rendered, PipelineError>> {
        let mut ignore = |_: usize, _: kiln_domain::preview::Preview| {};
        let mut previews = PreviewSink {
            every: 0,
            send: &mut ignore,
        };
        render::render_batch(self, inputs, on_step, &mut previews)
    }

    /// Renders as [`Pipeline::render_batch`] does and hands `previews` a live
    /// preview of input `index` every `previews.every` steps (see the
    /// `preview` module: the current latents projected to RGB, 64 px wide,
    /// PNG). The images rendered are the same bytes as without previews.
    pub fn render_batch_with_previews(
        &self,
        inputs: &[RenderInput<'_>],
        on_step: &mut dyn FnMut(usize, u32, u32) -> bool,
        previews: &mut PreviewSink<'_>,
    ) -> Vec<Result<Rendered, PipelineError>> {
        render::render_batch(self, inputs, on_step, previews)
    }

    /// Returns the UNet conditioning of one txt2img render of one step: text states
    /// for the guidance branches (rows ordered negative, prompt), SDXL's added
    /// conditioning, and for an inpainting UNet a mask of ones (repaint everything)
    /// with zero masked-image latents.
    fn conditioning(
        &self,
        prompt: &str,
        negative: Option<&str>,
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Conditioning, PipelineError> {
        let image = self.blank_image_conditioning(latent_height, latent_width)?;
        let scheduled = self.scheduled_conditioning(
            prompt,
            negative,
            1,
            (latent_height, latent_width),
            image,
            &text_extras::TextExtras::default(),
        )?;
        scheduled.select(&scheduled.rows_at(0))
    }

    /// Returns an inpainting UNet's image input for a render without a mask: a mask of
    /// ones and zero masked-image latents, `[1, 1 + latent channels, h, w]`; `None` for
    /// other UNets.
    fn blank_image_conditioning(
        &self,
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Option<Tensor>, PipelineError> {
        if !self.inpainting {
            return Ok(None);
        }
        let size = (latent_height, latent_width);
        let mask = Tensor::ones((1, 1, size.0, size.1), DType::F32, &self.device)?;
        let masked = Tensor::zeros(
            (1, self.latent_channels, size.0, size.1),
            DType::F32,
            &self.device,
        )?;
        Ok(Some(Tensor::cat(&[&mask, &masked], 1)?))
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

    /// Encodes one image `[1, 3, h, w]` (f32 in [-1, 1]) to scaled latents (f32): the
    /// mean of the VAE's distribution times the scaling factor, never a sample.
    fn encode(&self, image: &Tensor) -> Result<Tensor, PipelineError> {
        let mean = self.vae.encode(&image.to_dtype(self.vae_dtype)?)?;
        Ok((mean.to_dtype(DType::F32)? * self.vae_scaling_factor)?)
    }

    /// Decodes one image's latents `[1, c, h, w]` (f32) to 8-bit RGB:
    /// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
    fn decode(&self, latents: &Tensor) -> Result<RgbImage, PipelineError> {
        let latents = (latents / self.vae_scaling_factor)?.to_dtype(self.vae_dtype)?;
        let image = match self.vae_tile() {
            Some(tile) => vae_tiles::decode(&self.vae, &latents, tile, self.vae_downscale)?,
            None => self.vae.decode(&latents)?,
        }
        .to_dtype(DType::F32)?;
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
