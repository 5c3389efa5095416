//! PNG output: the pixels plus an A1111-style `parameters` text chunk and a
//! `kiln` chunk holding the full recipe as JSON. Nothing time- or
//! worker-dependent goes into the file, so equal recipes give equal bytes.

use kiln_domain::recipe::Recipe;
use serde::Serialize;

pub use crate::RgbImage;

/// Version of kiln's rendering pipeline: part of the determinism class and
/// of every PNG's `kiln` chunk. Bump it when the bytes a recipe renders change.
///
/// 2: prompts are weighted (A1111 syntax and `BREAK` used to be read as text);
/// unweighted txt2img prompts render the bytes of version 1.
/// 3: kiln's convolution in the UNet and the VAE (the same sums in another
/// order: outputs differ from version 2 in the last bits).
/// 4: the exact (erf) GELU in the UNet's feed-forward, as diffusers has it
/// (candle's tanh approximation moved UNet outputs ~1e-4), attention in query
/// blocks with an online softmax, and the fused group norm (other sums in
/// other orders).
/// 5: every matrix product on `gemm`'s AVX-512 kernels where the CPU has them
/// (other sums in other orders; AVX2-only CPUs keep version 4's kernels).
/// 6: 3×3 convolutions on large planes in the Winograd form F(2×2, 3×3) (the same
/// convolution in other sums: outputs differ from version 5 in the last bits).
/// 7: 3×3 convolutions on planes of 64×64 and more in the Winograd form
/// F(4×4, 3×3) (outputs differ from version 6 by about 5e-6 of a convolution's
/// largest value).
/// 8: attention in units of 128 queries (64 before), reading the queries and
/// values in place. An attention level of more than 64 tokens whose count is not
/// a multiple of 64 leaves a last unit of other rows than before, and `gemm` sums
/// a unit of very few rows in another order: such sizes may differ from version 7
/// in the last bits. The feed-forward runs in row chunks. (That session expected
/// the golden images to keep version 7's bytes but had no AVX-512 machine to check;
/// on one, 9 of the 16 changed.)
/// 9: kiln's linear layer (`linear`), its weight kept transposed: products of one
/// row or of at most 256 outputs (the tiny test models; an SD UNet's time
/// embedding projection without guidance) are summed in another order, so their
/// last bits differ from version 8; larger ones keep their bits. Winograd forms
/// on smaller planes: F(2×2, 3×3) from 16×16 (was 32×32), F(4×4, 3×3) from 32×32
/// (was 64×64), so at 256 px the UNet's 16×16 and 32×32 latent levels and the VAE
/// decoder's 32×32 level change by up to about 5e-6 of a convolution's largest
/// value.
pub const PIPELINE_VERSION: u32 = 9;

#[derive(Serialize)]
struct KilnChunk<'a> {
    recipe: &'a Recipe,
    recipe_hash: String,
    model_hash: &'a str,
    pipeline: u32,
}

/// Returns the A1111 `parameters` text of a recipe; img2img and inpainting add
/// `Denoising strength`, and the extras their lines ([`extras_parameters`]), as
/// the web UI writes them.
pub fn a1111_parameters(recipe: &Recipe, model_hash: &str) -> String {
    let short_hash: String = model_hash.chars().take(10).collect();
    let strength = match recipe.init_image {
        Some(_) => format!(", Denoising strength: {}", recipe.strength),
        None => String::new(),
    };
    let extras = extras_parameters(recipe);
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}{strength}{extras}",
        recipe.prompt,
        recipe.negative_prompt,
        recipe.steps,
        recipe.scheduler.a1111_name(recipe.karras),
        recipe.guidance,
        recipe.seed,
        recipe.width,
        recipe.height,
        short_hash,
        recipe.model
    )
}

/// Returns the A1111 fields of a recipe's extras, each after `, `: the hires
/// fix (`Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Denoising
/// strength: 0.5`; with an init image, whose strength is `Denoising strength`,
/// the second pass's is `Hires denoising strength`), one `ControlNet N: "Module:
/// canny, Model: pose [hash8], Weight: 1.0, Guidance Start: 0.0, Guidance End:
/// 1.0"` per ControlNet, `Lora hashes: "NAME: hash12, ..."` and `TI hashes:
/// "NAME: hash12, ..."`. Empty without extras.
pub fn extras_parameters(recipe: &Recipe) -> String {
    let extras = &recipe.extras;
    let short = |hash: &str, n: usize| hash.chars().take(n).collect::<String>();
    let mut out = String::new();
    if let Some(h) = &extras.hires {
        let denoise = if recipe.init_image.is_some() {
            "Hires denoising strength"
        } else {
            "Denoising strength"
        };
        out.push_str(&format!(
            ", Hires upscale: {}, Hires steps: {}, Hires upscaler: {}, {denoise}: {}",
            h.scale,
            h.steps,
            h.upscaler.a1111_name(),
            h.denoise
        ));
    }
    for (i, c) in extras.controlnets.iter().enumerate() {
        let model = if c.hash.is_empty() {
            c.model.clone()
        } else {
            format!("{} [{}]", c.model, short(&c.hash, 8))
        };
        out.push_str(&format!(
            ", ControlNet {i}: \"Module: {}, Model: {model}, Weight: {:?}, Guidance Start: {:?}, Guidance End: {:?}\"",
            c.preprocess.map_or("none", |p| p.name()),
            c.scale,
            c.start,
            c.end
        ));
    }
    let hashes = |list: Vec<(&str, &str)>| {
        list.iter()
            .map(|(name, hash)| format!("{name}: {}", short(hash, 12)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !extras.loras.is_empty() {
        let list = extras
            .loras
            .iter()
            .map(|l| (l.name.as_str(), l.hash.as_str()))
            .collect();
        out.push_str(&format!(", Lora hashes: \"{}\"", hashes(list)));
    }
    if !extras.embeddings.is_empty() {
        let list = extras
            .embeddings
            .iter()
            .map(|e| (e.name.as_str(), e.hash.as_str()))
            .collect();
        out.push_str(&format!(", TI hashes: \"{}\"", hashes(list)));
    }
    out
}

/// Encodes an image as PNG with the `parameters` and `kiln` metadata chunks,
/// with balanced compression (what rendered images use).
///
/// # Errors
/// When the pixel buffer does not match the size, or encoding fails.
pub fn encode_png(
    image: &RgbImage,
    recipe: &Recipe,
    model_hash: &str,
) -> Result<Vec<u8>, png::EncodingError> {
    encode_png_with(image, recipe, model_hash, png::Compression::Balanced)
}

/// [`encode_png`] with a chosen compression level; each level is deterministic.
///
/// # Errors
/// When the pixel buffer does not match the size, or encoding fails.
pub fn encode_png_with(
    image: &RgbImage,
    recipe: &Recipe,
    model_hash: &str,
    compression: png::Compression,
) -> Result<Vec<u8>, png::EncodingError> {
    let _span = tracing::info_span!("png_encode").entered();
    let mut out = Vec::with_capacity(image.pixels.len() / 2 + 1024);
    {
        let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(compression);
        add_text(
            &mut encoder,
            "parameters",
            &a1111_parameters(recipe, model_hash),
        )?;
        let chunk = KilnChunk {
            recipe,
            recipe_hash: recipe.hash(),
            model_hash,
            pipeline: PIPELINE_VERSION,
        };
        let json = serde_json::to_string(&chunk).unwrap_or_default();
        add_text(&mut encoder, "kiln", &json)?;
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&image.pixels)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Adds a text chunk: tEXt when the text is Latin-1, iTXt (UTF-8) otherwise.
fn add_text<W: std::io::Write>(
    encoder: &mut png::Encoder<'_, W>,
    keyword: &str,
    text: &str,
) -> Result<(), png::EncodingError> {
    if text.is_ascii() {
        encoder.add_text_chunk(keyword.to_string(), text.to_string())
    } else {
        encoder.add_itxt_chunk(keyword.to_string(), text.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_domain::recipe::Scheduler;

    fn recipe(prompt: &str) -> Recipe {
        Recipe {
            model: "tiny".into(),
            model_hash: "0123456789abcdef".into(),
            prompt: prompt.into(),
            negative_prompt: "blurry".into(),
            seed: 42,
            steps: 4,
            guidance: 5.0,
            width: 8,
            height: 8,
            scheduler: Scheduler::Ddim,
            karras: false,
            eta: 0.0,
            strength: 1.0,
            init_image: None,
            mask: None,
            noise_seed: None,
            extras: Default::default(),
        }
    }

    fn image() -> RgbImage {
        RgbImage {
            width: 8,
            height: 8,
            pixels: (0..192).map(|i| i as u8).collect(),
        }
    }

    #[test]
    fn chunks_carry_parameters_and_recipe() {
        let png = encode_png(&image(), &recipe("a café at night"), "0123456789abcdef").unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..192], &image().pixels[..]);
        let info = reader.info();
        let params = info
            .utf8_text
            .iter()
            .find(|c| c.keyword == "parameters")
            .unwrap()
            .get_text()
            .unwrap();
        assert!(params.starts_with("a café at night\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM, CFG scale: 5, Seed: 42, Size: 8x8, Model hash: 0123456789"));
        let kiln = info
            .uncompressed_latin1_text
            .iter()
            .find(|c| c.keyword == "kiln");
        let json = match kiln {
            Some(c) => c.text.clone(),
            None => info
                .utf8_text
                .iter()
                .find(|c| c.keyword == "kiln")
                .unwrap()
                .get_text()
                .unwrap(),
        };
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["recipe"]["seed"], 42);
        assert_eq!(v["model_hash"], "0123456789abcdef");
    }

    #[test]
    fn img2img_parameters_carry_the_denoising_strength() {
        let mut r = recipe("x");
        assert!(a1111_parameters(&r, "h").ends_with("Model: tiny"));
        r.init_image = Some("0".repeat(64));
        r.strength = 0.6;
        assert!(a1111_parameters(&r, "h").ends_with("Model: tiny, Denoising strength: 0.6"));
    }

    #[test]
    fn extras_add_a1111_lines() {
        use kiln_domain::extras::{
            ControlNetRef, EmbeddingRef, Hires, LoraRef, Preprocessor, ResizeMode, Upscaler,
        };
        let mut r = recipe("x");
        assert_eq!(extras_parameters(&r), "", "no extras, no lines");
        let lora = |name: &str, hash: &str| LoraRef {
            name: name.into(),
            hash: hash.into(),
            unet_weight: 0.8,
            te_weight: 0.8,
        };
        r.extras.loras = vec![
            lora("mira-v3", &format!("1a2b3c4d5e6f{}", "0".repeat(52))),
            lora("inkwash", &"f".repeat(64)),
        ];
        r.extras.embeddings = vec![EmbeddingRef {
            name: "badhands".into(),
            hash: "9".repeat(64),
        }];
        let control = |preprocess| ControlNetRef {
            model: "pose".into(),
            hash: format!("abcdef01{}", "2".repeat(56)),
            image: "3".repeat(64),
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            resize: ResizeMode::Crop,
            preprocess,
        };
        r.extras.controlnets = vec![control(None), control(Some(Preprocessor::Canny))];
        r.extras.controlnets[1].scale = 0.4;
        r.extras.controlnets[1].end = 0.8;
        r.extras.hires = Some(Hires {
            scale: 2.0,
            steps: 10,
            denoise: 0.5,
            upscaler: Upscaler::Latent,
        });
        let p = a1111_parameters(&r, "h");
        assert!(
            p.ends_with(concat!(
                "Model: tiny, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Denoising strength: 0.5",
                ", ControlNet 0: \"Module: none, Model: pose [abcdef01], Weight: 1.0, Guidance Start: 0.0, Guidance End: 1.0\"",
                ", ControlNet 1: \"Module: canny, Model: pose [abcdef01], Weight: 0.4, Guidance Start: 0.0, Guidance End: 0.8\"",
                ", Lora hashes: \"mira-v3: 1a2b3c4d5e6f, inkwash: ffffffffffff\"",
                ", TI hashes: \"badhands: 999999999999\""
            )),
            "{p}"
        );
        // Size stays the first pass's, as A1111 writes it; img2img keeps its own strength.
        assert!(p.contains("Size: 8x8"), "{p}");
        r.init_image = Some("0".repeat(64));
        r.strength = 0.6;
        let p = a1111_parameters(&r, "h");
        assert!(
            p.contains("Model: tiny, Denoising strength: 0.6, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Hires denoising strength: 0.5"),
            "{p}"
        );
    }

    #[test]
    fn encoding_is_deterministic() {
        let a = encode_png(&image(), &recipe("x"), "h").unwrap();
        let b = encode_png(&image(), &recipe("x"), "h").unwrap();
        assert_eq!(a, b);
    }
}
