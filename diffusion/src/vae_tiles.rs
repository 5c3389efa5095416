//! Tiled VAE decoding (`--vae-tile PX`): latents larger than one tile are
//! decoded tile by tile, so the decoder's activations never span more than one
//! tile, and the tiles are blended over their overlaps.
//!
//! The tiling is diffusers' `AutoencoderKL.tiled_decode` with
//! `tile_sample_min_size = PX` and its overlap factor of 0.25: latent tiles of
//! `PX / 8` (times the VAE's downscale) start every 3/4 of a tile; each decoded
//! tile is blended linearly with the one above over the top quarter of a tile,
//! then with the one on its left over its left quarter, and keeps its first
//! three quarters. A latent image no larger than one tile decodes untiled, so
//! its bytes equal an untiled worker's. A larger one differs from untiled
//! decoding (each tile's group norms see only the tile), which is why the
//! determinism class names the tile size ([`VaeTile::class_suffix`]).

use candle_core::{DType, Device, Tensor};

use crate::vae::Vae;

/// The overlap of neighbouring tiles, as a share of a tile (diffusers' `tile_overlap_factor`).
const OVERLAP: f64 = 0.25;

/// A decoded tile's side in pixels: at least [`VaeTile::MIN`], a multiple of [`VaeTile::STEP`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaeTile(u32);

/// Why a `--vae-tile` value is refused.
#[derive(Debug, thiserror::Error)]
#[error("--vae-tile must be a whole number of pixels, a multiple of {step} and at least {min}, got {got:?}", step = VaeTile::STEP, min = VaeTile::MIN)]
pub struct VaeTileError {
    /// The value given.
    got: String,
}

impl VaeTile {
    /// The smallest tile: 8 latent pixels of SD's VAE.
    pub const MIN: u32 = 64;
    /// Tiles are whole multiples of 64 pixels, so their overlaps are whole latent pixels.
    pub const STEP: u32 = 64;

    /// Parses a `--vae-tile` value in pixels.
    ///
    /// # Errors
    /// [`VaeTileError`] unless it is a multiple of [`VaeTile::STEP`] of at least [`VaeTile::MIN`].
    pub fn parse(value: &str) -> Result<Self, VaeTileError> {
        value
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|&px| px >= Self::MIN && px % Self::STEP == 0)
            .map(Self)
            .ok_or_else(|| VaeTileError {
                got: value.to_string(),
            })
    }

    /// The tile's side in pixels.
    pub fn pixels(self) -> u32 {
        self.0
    }

    /// What a determinism class gains when decoding is tiled: tiled and untiled
    /// bytes of images larger than a tile differ, so they are never compared.
    pub fn class_suffix(tile: Option<Self>) -> String {
        tile.map_or_else(String::new, |t| format!("/vae-tile-{}", t.0))
    }
}

/// Decodes `latents` (`[1, c, h, w]`, unscaled, in the VAE's dtype) tile by
/// tile when they are larger than one tile of `tile` pixels (`downscale`
/// pixels per latent pixel); else as one piece. Returns `[1, 3, 8h, 8w]`.
pub(crate) fn decode(
    vae: &Vae,
    latents: &Tensor,
    tile: VaeTile,
    downscale: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = latents.dims4()?;
    let sample = tile.0 as usize;
    let latent_tile = sample / downscale;
    if h <= latent_tile && w <= latent_tile {
        return vae.decode(latents);
    }
    let stride = (latent_tile as f64 * (1.0 - OVERLAP)) as usize;
    let blend = (sample as f64 * OVERLAP) as usize;
    let keep = sample - blend;
    let mut rows: Vec<Vec<Plane>> = Vec::new();
    for top in (0..h).step_by(stride.max(1)) {
        let mut row = Vec::new();
        for left in (0..w).step_by(stride.max(1)) {
            let piece = latents
                .narrow(2, top, latent_tile.min(h - top))?
                .narrow(3, left, latent_tile.min(w - left))?
                .contiguous()?;
            row.push(Plane::of(&vae.decode(&piece)?)?);
        }
        rows.push(row);
    }
    // Blend each tile with the one above and the one on its left (already
    // blended themselves), in diffusers' order, then keep its first `keep`
    // rows and columns.
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            if i > 0 {
                let above = rows[i - 1][j].clone();
                rows[i][j].blend_from_above(&above, blend);
            }
            if j > 0 {
                let left = rows[i][j - 1].clone();
                rows[i][j].blend_from_left(&left, blend);
            }
        }
    }
    let out_h: usize = rows.iter().map(|r| r[0].h.min(keep)).sum();
    let out_w: usize = rows[0].iter().map(|t| t.w.min(keep)).sum();
    let channels = rows[0][0].c;
    let mut out = vec![0f32; channels * out_h * out_w];
    let mut y0 = 0;
    for row in &rows {
        let mut x0 = 0;
        let th = row[0].h.min(keep);
        for t in row {
            let tw = t.w.min(keep);
            for c in 0..channels {
                for y in 0..th {
                    let src = &t.data[(c * t.h + y) * t.w..][..tw];
                    out[(c * out_h + y0 + y) * out_w + x0..][..tw].copy_from_slice(src);
                }
            }
            x0 += tw;
        }
        y0 += th;
    }
    Tensor::from_vec(out, (1, channels, out_h, out_w), &Device::Cpu)?
        .to_device(latents.device())?
        .to_dtype(latents.dtype())
}

/// One decoded tile as f32 planes, channel by channel, row by row.
#[derive(Clone)]
struct Plane {
    c: usize,
    h: usize,
    w: usize,
    data: Vec<f32>,
}

impl Plane {
    /// Copies a `[1, c, h, w]` tensor out of the device.
    fn of(t: &Tensor) -> candle_core::Result<Self> {
        let (_, c, h, w) = t.dims4()?;
        let data = t
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { c, h, w, data })
    }

    /// diffusers' `blend_v`: row `y < extent` becomes `above[h - extent + y] ·
    /// (1 - y/extent) + self[y] · y/extent`.
    fn blend_from_above(&mut self, above: &Plane, extent: usize) {
        let extent = extent.min(above.h).min(self.h);
        let w = self.w.min(above.w);
        for c in 0..self.c {
            for y in 0..extent {
                let t = y as f32 / extent as f32;
                let a = &above.data[(c * above.h + above.h - extent + y) * above.w..][..w];
                let b = &mut self.data[(c * self.h + y) * self.w..][..w];
                for (b, a) in b.iter_mut().zip(a) {
                    *b = *a * (1.0 - t) + *b * t;
                }
            }
        }
    }

    /// diffusers' `blend_h`: column `x < extent` becomes `left[w - extent + x] ·
    /// (1 - x/extent) + self[x] · x/extent`.
    fn blend_from_left(&mut self, left: &Plane, extent: usize) {
        let extent = extent.min(left.w).min(self.w);
        let h = self.h.min(left.h);
        for c in 0..self.c {
            for y in 0..h {
                let a = &left.data[(c * left.h + y) * left.w + left.w - extent..][..extent];
                let b = &mut self.data[(c * self.h + y) * self.w..][..extent];
                for (x, (b, a)) in b.iter_mut().zip(a).enumerate() {
                    let t = x as f32 / extent as f32;
                    *b = *a * (1.0 - t) + *b * t;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tile_is_a_multiple_of_64_pixels() {
        assert_eq!(VaeTile::parse("512").map(VaeTile::pixels).ok(), Some(512));
        assert_eq!(VaeTile::parse("64").map(VaeTile::pixels).ok(), Some(64));
        for bad in ["0", "32", "100", "-64", "big", ""] {
            let e = VaeTile::parse(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("--vae-tile")),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(VaeTile::class_suffix(None), "");
        assert_eq!(
            VaeTile::class_suffix(VaeTile::parse("256").ok()),
            "/vae-tile-256"
        );
    }

    #[test]
    fn blending_ramps_from_the_neighbour_to_the_tile() {
        let plane = |v: f32| Plane {
            c: 1,
            h: 4,
            w: 4,
            data: vec![v; 16],
        };
        let mut below = plane(1.0);
        below.blend_from_above(&plane(0.0), 2);
        // Rows 0 and 1 ramp 0 → 0.5; rows 2 and 3 are the tile's own.
        assert_eq!(&below.data[..4], &[0.0; 4]);
        assert_eq!(&below.data[4..8], &[0.5; 4]);
        assert_eq!(&below.data[8..], &[1.0; 8]);
        let mut right = plane(1.0);
        right.blend_from_left(&plane(0.0), 2);
        assert_eq!(&right.data[..4], &[0.0, 0.5, 1.0, 1.0]);
    }

    #[test]
    fn large_images_decode_in_tiles_and_small_ones_keep_their_bytes()
    -> Result<(), Box<dyn std::error::Error>> {
        use crate::tests::{recipe, render};
        // A pipeline of its own: the shared tiny one must stay untiled.
        let dir = tempfile::tempdir()?;
        crate::write_tiny_model(dir.path())?;
        let pipeline = crate::Pipeline::load(dir.path(), &Device::Cpu)?;
        let small = recipe("a lighthouse on a cliff", 3);
        let big = crate::Recipe {
            width: 128,
            height: 96,
            ..small.clone()
        };
        let (small_untiled, big_untiled) = (render(&pipeline, &small)?, render(&pipeline, &big)?);
        pipeline.set_vae_tile(Some(VaeTile::parse("64")?));
        assert_eq!(pipeline.vae_tile().map(VaeTile::pixels), Some(64));
        assert!(
            render(&pipeline, &small)? == small_untiled,
            "an image of one tile decodes untiled"
        );
        let big_tiled = render(&pipeline, &big)?;
        assert_eq!((big_tiled.width, big_tiled.height), (128, 96));
        assert!(big_tiled != big_untiled, "a larger image is tiled");
        assert!(
            render(&pipeline, &big)? == big_tiled,
            "tiled decoding is deterministic"
        );
        pipeline.set_vae_tile(None);
        assert!(render(&pipeline, &big)? == big_untiled);
        Ok(())
    }
}
