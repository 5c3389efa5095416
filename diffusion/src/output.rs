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
pub const PIPELINE_VERSION: u32 = 4;

#[derive(Serialize)]
struct KilnChunk<'a> {
    recipe: &'a Recipe,
    recipe_hash: String,
    model_hash: &'a str,
    pipeline: u32,
}

/// Returns the A1111 `parameters` text of a recipe; img2img and inpainting add
/// `Denoising strength`, as the web UI writes it.
pub fn a1111_parameters(recipe: &Recipe, model_hash: &str) -> String {
    let short_hash: String = model_hash.chars().take(10).collect();
    let strength = match recipe.init_image {
        Some(_) => format!(", Denoising strength: {}", recipe.strength),
        None => String::new(),
    };
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}{strength}",
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
    fn encoding_is_deterministic() {
        let a = encode_png(&image(), &recipe("x"), "h").unwrap();
        let b = encode_png(&image(), &recipe("x"), "h").unwrap();
        assert_eq!(a, b);
    }
}
