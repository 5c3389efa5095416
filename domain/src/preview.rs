//! Live previews: the small images of a render in progress that a worker
//! sends every few denoising steps, the coordinator keeps (the latest per
//! task, never in the result store) and `kiln watch --previews` or the
//! dashboard show.
//!
//! One definition of their shape for every side: [`WIDTH`] pixels wide, the
//! image's aspect ratio ([`size_for`]), PNG ([`encode`]), at most
//! [`MAX_BYTES`]; the coordinator refuses anything else ([`check`]).

use crate::error::FieldError;

/// Width of every preview, in pixels.
pub const WIDTH: u32 = 64;
/// Tallest preview accepted: an image 8 times taller than wide.
pub const MAX_HEIGHT: u32 = WIDTH * 8;
/// Largest preview PNG accepted. An uncompressed 64 × 512 RGB PNG is under
/// 100 KB; real previews compress to a few KB.
pub const MAX_BYTES: usize = 128 * 1024;
/// Denoising steps between previews unless the worker is told otherwise
/// (`kiln-worker --preview-every`).
pub const DEFAULT_EVERY: u32 = 5;

/// A preview of one task: the step it shows and its PNG bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preview {
    /// Denoising steps done when it was made.
    pub step: u32,
    /// A PNG [`WIDTH`] pixels wide.
    pub png: Vec<u8>,
}

/// Returns the preview size of an image of `width` × `height`: [`WIDTH`]
/// wide, the height in proportion (rounded, at least 1, at most [`MAX_HEIGHT`]).
pub fn size_for(width: u32, height: u32) -> (u32, u32) {
    let width = u64::from(width.max(1));
    let height = (u64::from(height) * u64::from(WIDTH) + width / 2) / width;
    (WIDTH, height.clamp(1, u64::from(MAX_HEIGHT)) as u32)
}

/// Returns whether a render of `steps` steps sends a preview after step
/// `done` when previews come every `every` steps (0: never). The last step
/// sends none: the finished image follows at once.
pub fn due(every: u32, done: u32, steps: u32) -> bool {
    every > 0 && done > 0 && done < steps && done.is_multiple_of(every)
}

/// Encodes `pixels` (RGB, row by row) as a PNG.
///
/// # Errors
/// A message when the pixel count does not match the size or encoding fails.
pub fn encode(width: u32, height: u32, pixels: Vec<u8>) -> Result<Vec<u8>, String> {
    let img = image::RgbImage::from_raw(width, height, pixels).ok_or_else(|| {
        format!(
            "a {width}x{height} preview needs {} bytes",
            width * height * 3
        )
    })?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| format!("cannot encode a preview: {e}"))?;
    Ok(out.into_inner())
}

/// Checks that `png` is a preview: a PNG of at most [`MAX_BYTES`], [`WIDTH`]
/// pixels wide and at most [`MAX_HEIGHT`] tall; returns its height. Reads
/// the header only.
///
/// # Errors
/// Names `path` and says what is wrong.
pub fn check(path: &str, png: &[u8]) -> Result<u32, FieldError> {
    if png.len() > MAX_BYTES {
        return Err(FieldError::new(
            path,
            format!("is {} bytes, more than the limit of {MAX_BYTES}", png.len()),
        ));
    }
    let reader =
        image::ImageReader::with_format(std::io::Cursor::new(png), image::ImageFormat::Png);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| FieldError::new(path, format!("is not a PNG: {e}")))?;
    if w != WIDTH || h == 0 || h > MAX_HEIGHT {
        return Err(FieldError::new(
            path,
            format!("is {w}x{h}; a preview is {WIDTH} wide and 1 to {MAX_HEIGHT} tall"),
        ));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_keep_the_aspect_ratio_at_64_wide() {
        assert_eq!(size_for(512, 512), (64, 64));
        assert_eq!(size_for(1024, 768), (64, 48));
        assert_eq!(size_for(64, 128), (64, 128));
        assert_eq!(size_for(8192, 8), (64, 1));
        assert_eq!(size_for(8, 8192), (64, MAX_HEIGHT));
    }

    #[test]
    fn previews_are_due_every_n_steps_but_not_after_the_last() {
        let due_at: Vec<u32> = (1..=20).filter(|&s| due(5, s, 20)).collect();
        assert_eq!(due_at, [5, 10, 15]);
        assert!((1..=20).all(|s| !due(0, s, 20)));
    }

    #[test]
    fn encoded_previews_pass_the_check_and_others_do_not() {
        let png = encode(64, 48, vec![7; 64 * 48 * 3]).unwrap();
        assert_eq!(check("preview", &png).unwrap(), 48);
        let wide = encode(65, 4, vec![7; 65 * 4 * 3]).unwrap();
        assert!(
            check("preview", &wide)
                .unwrap_err()
                .to_string()
                .contains("65x4")
        );
        let e = check("tasks[0].preview_png", b"not a png").unwrap_err();
        assert_eq!(e.path, "tasks[0].preview_png");
        assert!(encode(64, 48, vec![0; 5]).is_err());
    }
}
