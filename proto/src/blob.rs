//! Blobs on the wire: images a recipe refers to by sha256 (init images,
//! masks), sent once per job and checked when it is submitted.

use kiln_domain::error::FieldError;
pub use kiln_domain::image::{MAX_BLOB_BYTES, MAX_IMAGE_SIDE, check_image, sha256_hex};

use crate::pb;

/// Returns a blob for `data`.
pub fn blob(data: Vec<u8>) -> pb::Blob {
    pb::Blob {
        sha256: sha256_hex(&data),
        data,
    }
}

/// Checks every blob of a spec: the hash matches the bytes, and the bytes are an image.
pub fn check_blobs(blobs: &[pb::Blob]) -> Result<(), FieldError> {
    for (i, b) in blobs.iter().enumerate() {
        let path = format!("blobs[{i}]");
        let actual = sha256_hex(&b.data);
        if actual != b.sha256 {
            return Err(FieldError::new(
                path,
                format!("sha256 is {actual}, not {}", b.sha256),
            ));
        }
        check_image(&path, &b.data)?;
    }
    Ok(())
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
    fn blob_hashes_must_match() {
        let mut b = blob(png(4, 4));
        assert!(check_blobs(std::slice::from_ref(&b)).is_ok());
        b.sha256 = "00".repeat(32);
        assert_eq!(check_blobs(&[b]).unwrap_err().path, "blobs[0]");
    }
}
