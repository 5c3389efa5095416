//! `kiln preprocess canny|scribble|lineart IN --out OUT`: turns a picture into a
//! ControlNet control map with the weight-free preprocessors that recipes name
//! in `preprocess = "..."` (`kiln_diffusion::preprocess`, one implementation
//! for both).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use kiln_diffusion::preprocess;

/// Make a ControlNet control map from a picture (canny, scribble, lineart).
#[derive(clap::Args, Debug)]
pub struct Preprocess {
    #[command(subcommand)]
    command: Kind,
}

#[derive(Subcommand, Debug)]
enum Kind {
    /// Canny edges, white on black.
    Canny {
        /// The picture (PNG or JPEG).
        input: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// Gradients below this are never edges.
        #[arg(long, default_value_t = preprocess::CANNY_DEFAULT.0)]
        low: f32,
        /// Gradients above this always are.
        #[arg(long, default_value_t = preprocess::CANNY_DEFAULT.1)]
        high: f32,
    },
    /// A sketch's dark lines as white lines on black (threshold and invert).
    Scribble {
        /// The sketch (PNG or JPEG).
        input: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// A drawing's lines, white on black.
    Lineart {
        /// The drawing (PNG or JPEG).
        input: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// A preprocessor with its settings.
type Map = Box<dyn Fn(&image::RgbImage) -> image::RgbImage>;

impl Preprocess {
    /// Runs `kiln preprocess ...`.
    pub fn run(self) -> anyhow::Result<bool> {
        let (input, out, map): (PathBuf, PathBuf, Map) = match self.command {
            Kind::Canny {
                input,
                out,
                low,
                high,
            } => {
                if !(low.is_finite() && high.is_finite() && low <= high) {
                    anyhow::bail!(
                        "--low {low} and --high {high}: need finite numbers with low <= high"
                    );
                }
                (
                    input,
                    out,
                    Box::new(move |i| preprocess::canny(i, low, high)),
                )
            }
            Kind::Scribble { input, out } => (input, out, Box::new(preprocess::scribble)),
            Kind::Lineart { input, out } => (input, out, Box::new(preprocess::lineart)),
        };
        let picture = read(&input)?;
        let result = map(&picture);
        result
            .save_with_format(&out, image::ImageFormat::Png)
            .with_context(|| format!("cannot write {}", out.display()))?;
        Ok(true)
    }
}

/// Reads a PNG or JPEG as 8-bit RGB.
fn read(path: &Path) -> anyhow::Result<image::RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a decodable image", path.display()))?;
    Ok(img.to_rgb8())
}
