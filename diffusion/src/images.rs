//! Init images and masks: decoding and checking the bytes a task carries,
//! resizing them to the recipe's size, and the tensors and masks the render
//! loop needs from them.
//!
//! - **Formats.** PNG or JPEG, as the coordinator accepted them
//!   (`kiln_domain::image`); the same limits are checked again here, so a task
//!   that reaches a worker some other way is refused with a `BadInput`-class
//!   error (`InvalidRecipe` naming `init_image` or `mask`), never a panic.
//! - **Init images** are converted to 8-bit RGB (an alpha channel is dropped)
//!   and resized to the recipe's width × height with a Lanczos3 filter, as the
//!   A1111 web UI resizes with "Just resize" (aspect ratio not kept); an image
//!   already of that size is used as it is, byte for byte.
//! - **Masks** are converted to 8-bit grey (white = repaint), resized with a
//!   bilinear filter and thresholded at 50% (grey ≥ 128 repaints), as diffusers'
//!   mask processor binarizes. A hard mask keeps the unmasked pixels exactly the
//!   init image's. At latent resolution a latent pixel is repainted when any
//!   pixel of its 8 × 8 block is ([`latent_mask`]): the latents then never hold
//!   back a pixel the mask asks to repaint.

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use kiln_domain::image::{MAX_BLOB_BYTES, MAX_IMAGE_SIDE};

use super::RgbImage;
use super::error::PipelineError;

/// Returns an `InvalidRecipe` error on `field`.
fn invalid(field: &'static str, message: String) -> PipelineError {
    PipelineError::InvalidRecipe { field, message }
}

/// Decodes and checks PNG or JPEG bytes.
pub(crate) fn decode(
    field: &'static str,
    bytes: &[u8],
) -> Result<image::DynamicImage, PipelineError> {
    if bytes.len() > MAX_BLOB_BYTES {
        return Err(invalid(
            field,
            format!(
                "is {} bytes, more than the limit of {MAX_BLOB_BYTES}",
                bytes.len()
            ),
        ));
    }
    let format = match image::guess_format(bytes) {
        Ok(f @ (image::ImageFormat::Png | image::ImageFormat::Jpeg)) => f,
        Ok(other) => {
            return Err(invalid(
                field,
                format!("must be a PNG or JPEG image, got {other:?}"),
            ));
        }
        Err(_) => {
            return Err(invalid(
                field,
                "must be a PNG or JPEG image, got unrecognised bytes".into(),
            ));
        }
    };
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| invalid(field, format!("cannot be decoded: {e}")))?;
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(invalid(
            field,
            format!("is {w}x{h}: an image with no pixels"),
        ));
    }
    Ok(img)
}

/// Decodes an init image and resizes it to `width` × `height` (Lanczos3).
///
/// # Errors
///
/// `InvalidRecipe` on `init_image` when the bytes are not a decodable PNG or JPEG
/// within the size limits, or have no pixels.
pub(crate) fn init_image(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, PipelineError> {
    let rgb = decode("init_image", bytes)?.to_rgb8();
    let rgb = if rgb.dimensions() == (width, height) {
        rgb
    } else {
        image::imageops::resize(&rgb, width, height, FilterType::Lanczos3)
    };
    Ok(RgbImage {
        width,
        height,
        pixels: rgb.into_raw(),
    })
}

/// Decodes a mask, resizes it to `width` × `height` (bilinear) and returns, per pixel
/// row by row, whether it is repainted (grey ≥ 128).
///
/// # Errors
///
/// As [`init_image`], naming `mask`.
pub(crate) fn mask(bytes: &[u8], width: u32, height: u32) -> Result<Vec<bool>, PipelineError> {
    let grey = decode("mask", bytes)?.to_luma8();
    let grey = if grey.dimensions() == (width, height) {
        grey
    } else {
        image::imageops::resize(&grey, width, height, FilterType::Triangle)
    };
    Ok(grey.into_raw().into_iter().map(|v| v >= 128).collect())
}

/// Returns `image` as a `[1, 3, h, w]` f32 tensor in [-1, 1] (`x / 127.5 - 1`).
pub(crate) fn to_tensor(image: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = (image.width as usize, image.height as usize);
    let values: Vec<f32> = image
        .pixels
        .iter()
        .map(|&p| f32::from(p) / 127.5 - 1.0)
        .collect();
    Tensor::from_vec(values, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()
}

/// Returns `image` with the repainted pixels set to 0 (mid grey in [-1, 1]): the
/// masked image an inpainting UNet sees, as diffusers builds it (`image * (mask < 0.5)`).
pub(crate) fn masked_tensor(
    image: &RgbImage,
    repaint: &[bool],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let keep: Vec<f32> = repaint.iter().map(|&r| if r { 0.0 } else { 1.0 }).collect();
    let keep = Tensor::from_vec(
        keep,
        (1, 1, image.height as usize, image.width as usize),
        device,
    )?;
    to_tensor(image, device)?.broadcast_mul(&keep)
}

/// Returns the mask at latent resolution, `[1, 1, h / f, w / f]` with 1 where a latent
/// pixel is repainted: where any image pixel of its `f` × `f` block is.
pub(crate) fn latent_mask(
    repaint: &[bool],
    width: usize,
    height: usize,
    factor: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (lw, lh) = (width / factor, height / factor);
    let mut values = vec![0f32; lw * lh];
    for (i, &r) in repaint.iter().enumerate() {
        if r {
            let (x, y) = (i % width / factor, i / width / factor);
            if x < lw && y < lh {
                values[y * lw + x] = 1.0;
            }
        }
    }
    Tensor::from_vec(values, (1, 1, lh, lw), device)?.to_dtype(DType::F32)
}

/// Copies the pixels of `init` that the mask keeps (not repainted) into `image`.
pub(crate) fn keep_unmasked(image: &mut RgbImage, init: &RgbImage, repaint: &[bool]) {
    for ((out, src), &r) in image
        .pixels
        .chunks_exact_mut(3)
        .zip(init.pixels.chunks_exact(3))
        .zip(repaint)
    {
        if !r {
            out.copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(img: &image::DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn images_of_the_recipe_size_are_kept_and_others_resized() {
        let img = image::RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let same = init_image(&png(&img.clone().into()), 16, 8).unwrap();
        assert_eq!(same.pixels, img.as_raw().clone());
        let resized = init_image(&png(&img.into()), 32, 32).unwrap();
        assert_eq!((resized.width, resized.height), (32, 32));
        assert_eq!(resized.pixels.len(), 32 * 32 * 3);
        // A grey-with-alpha PNG is converted.
        let la = image::DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_pixel(
            4,
            4,
            image::LumaA([200, 10]),
        ));
        assert_eq!(
            init_image(&png(&la), 4, 4).unwrap().pixels[..3],
            [200, 200, 200]
        );
    }

    #[test]
    fn bad_bytes_are_invalid_input_naming_the_field() {
        for (bytes, what) in [
            (b"not an image".to_vec(), "unrecognised"),
            (b"GIF89a\x01\x00\x01\x00".to_vec(), "PNG or JPEG"),
            (
                png(&image::RgbImage::new(4, 4).into())[..40].to_vec(),
                "decoded",
            ),
        ] {
            let e = init_image(&bytes, 8, 8).unwrap_err();
            assert!(
                matches!(&e, PipelineError::InvalidRecipe { field: "init_image", message } if message.contains(what)),
                "{e}"
            );
            let e = mask(&bytes, 8, 8).unwrap_err();
            assert!(
                matches!(&e, PipelineError::InvalidRecipe { field: "mask", .. }),
                "{e}"
            );
        }
    }

    #[test]
    fn masks_threshold_and_cover_latent_blocks() {
        // Left half white (repaint), right half black; one grey pixel below 128.
        let mut m =
            image::GrayImage::from_fn(16, 8, |x, _| image::Luma([if x < 8 { 255 } else { 0 }]));
        m.put_pixel(12, 3, image::Luma([127]));
        m.put_pixel(9, 0, image::Luma([128]));
        let repaint = mask(&png(&m.into()), 16, 8).unwrap();
        assert!(repaint[0] && !repaint[15] && !repaint[3 * 16 + 12] && repaint[9]);
        let latent = latent_mask(&repaint, 16, 8, 8, &Device::Cpu).unwrap();
        // Block (1, 0) holds the one repainted pixel (9, 0).
        assert_eq!(
            latent.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 1.0]
        );

        let init = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![1, 2, 3, 4, 5, 6],
        };
        let mut out = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![9; 6],
        };
        keep_unmasked(&mut out, &init, &[true, false]);
        assert_eq!(out.pixels, [9, 9, 9, 4, 5, 6]);
    }

    #[test]
    fn tensors_map_bytes_to_minus_one_one() {
        let img = RgbImage {
            width: 1,
            height: 2,
            pixels: vec![0, 255, 51, 255, 0, 0],
        };
        let t = to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 3, 2, 1]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 1.0);
        assert_eq!(v[2], 1.0);
        let masked = masked_tensor(&img, &[true, false], &Device::Cpu).unwrap();
        let v = masked.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!((v[0], v[1]), (0.0, 1.0));
    }
}
