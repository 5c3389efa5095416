//! Images a recipe refers to by sha256 (init images, masks): their limits and
//! the check every side runs before decoding one.

use sha2::{Digest, Sha256};

use crate::error::FieldError;

/// Largest accepted blob.
pub const MAX_BLOB_BYTES: usize = 32 * 1024 * 1024;
/// Largest accepted image side in pixels.
pub const MAX_IMAGE_SIDE: u32 = 8192;

/// Returns the sha256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Checks that `data` is a decodable PNG or JPEG of sane size; returns its size.
///
/// # Errors
/// Names `path` and says what is wrong: too big, not PNG/JPEG, undecodable.
pub fn check_image(path: &str, data: &[u8]) -> Result<(u32, u32), FieldError> {
    if data.len() > MAX_BLOB_BYTES {
        return Err(FieldError::new(
            path,
            format!(
                "is {} bytes, more than the limit of {MAX_BLOB_BYTES}",
                data.len()
            ),
        ));
    }
    let format = match image::guess_format(data) {
        Ok(f @ (image::ImageFormat::Png | image::ImageFormat::Jpeg)) => f,
        Ok(other) => {
            return Err(FieldError::new(
                path,
                format!("must be a PNG or JPEG image, got {other:?}"),
            ));
        }
        Err(_) => {
            return Err(FieldError::new(
                path,
                "must be a PNG or JPEG image, got unrecognised bytes",
            ));
        }
    };
    let reader = image::ImageReader::with_format(std::io::Cursor::new(data), format);
    let img = reader
        .decode()
        .map_err(|e| FieldError::new(path, format!("cannot be decoded: {e}")))?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 || w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
        return Err(FieldError::new(
            path,
            format!("is {w}x{h}; sides must be between 1 and {MAX_IMAGE_SIDE}"),
        ));
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn images_are_decoded_and_measured() {
        assert_eq!(check_image("x", &png(16, 8)).unwrap(), (16, 8));
        let e = check_image("items[0].init_image", b"GIF89a....").unwrap_err();
        assert_eq!(e.path, "items[0].init_image");
        let mut broken = png(16, 8);
        broken.truncate(40);
        assert!(
            check_image("x", &broken)
                .unwrap_err()
                .message
                .contains("decoded")
        );
    }
}
