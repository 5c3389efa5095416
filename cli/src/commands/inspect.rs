//! `kiln inspect FILE.png`: prints the A1111 `parameters` text and the `kiln`
//! chunk's recipe JSON that a kiln render carries (tEXt, zTXt or iTXt).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kiln_domain::png_text::read;
use serde_json::json;

/// Print the A1111 parameters and the kiln recipe stored in a rendered PNG.
#[derive(clap::Args, Debug)]
pub struct Inspect {
    /// The PNG file.
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Inspect {
    /// Runs `kiln inspect`.
    pub fn run(self) -> anyhow::Result<bool> {
        show(&self.file, self.json).map(|()| true)
    }
}

/// Prints what `file` carries.
///
/// # Errors
/// When the file cannot be read, is not a PNG, or has neither chunk.
fn show(file: &Path, json: bool) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let text = read(&bytes).with_context(|| format!("{}", file.display()))?;
    if text.parameters.is_none() && text.kiln.is_none() {
        bail!(
            "{}: no `parameters` or `kiln` text chunk: not an image from kiln or the A1111 web UI",
            file.display()
        );
    }
    if json {
        println!(
            "{}",
            json!({
                "file": file.display().to_string(),
                "parameters": text.parameters,
                "kiln": text.kiln,
            })
        );
        return Ok(());
    }
    if let Some(parameters) = &text.parameters {
        println!("parameters:\n{parameters}");
    }
    if let Some(kiln) = &text.kiln {
        if text.parameters.is_some() {
            println!();
        }
        println!("kiln:\n{}", serde_json::to_string_pretty(kiln)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_diffusion::output::{RgbImage, encode_png};
    use kiln_domain::png_text::PngText;

    fn png_of(prompt: &str) -> Vec<u8> {
        let spec = kiln_proto::spec::JobSpec {
            items: vec![kiln_proto::spec::RecipeFields {
                model: Some("tiny".into()),
                prompt: Some(prompt.into()),
                seed: Some(42),
                width: Some(64),
                height: Some(64),
                ..Default::default()
            }],
            ..Default::default()
        };
        let recipe = kiln_proto::spec::validate(&spec, 0)
            .unwrap()
            .remove(0)
            .recipe;
        let image = RgbImage {
            width: 2,
            height: 2,
            pixels: vec![7; 12],
        };
        encode_png(&image, &recipe, "0123456789abcdef").unwrap()
    }

    #[test]
    fn both_chunks_come_back_ascii_and_utf8() {
        for prompt in ["a red fox", "un café (la nuit:1.2)"] {
            let text = read(&png_of(prompt)).unwrap();
            let parameters = text.parameters.unwrap();
            assert!(parameters.starts_with(prompt), "{parameters}");
            assert!(parameters.contains("Seed: 42"), "{parameters}");
            let kiln = text.kiln.unwrap();
            assert_eq!(kiln["recipe"]["prompt"], prompt);
            assert_eq!(kiln["recipe"]["seed"], 42);
            assert_eq!(kiln["model_hash"], "0123456789abcdef");
        }
    }

    #[test]
    fn a_png_without_chunks_is_read_as_empty_and_garbage_is_an_error() {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, 1, 1);
            encoder.set_color(png::ColorType::Grayscale);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[0]).unwrap();
        }
        assert_eq!(read(&out).unwrap(), PngText::default());
        assert!(read(b"not a png").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.png");
        std::fs::write(&path, &out).unwrap();
        let e = show(&path, false).unwrap_err();
        assert!(e.to_string().contains("no `parameters` or `kiln`"), "{e}");
    }
}
