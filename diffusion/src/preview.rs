//! Live previews of a render in progress: the latents projected to RGB with
//! the model family's linear latent-to-RGB factors, without the VAE.
//!
//! **What is shown.** After a denoising step, the *current* latents (not the
//! predicted x0), brought to unit scale the way the UNet's next input is
//! (`Sampler::scale_model_input`: sigma-space samplers divide by
//! `sqrt(sigma² + 1)`, DDIM's latents already are at that scale), so a preview
//! of an early step is the noisy picture at a sensible brightness rather than
//! a saturated one. Each latent pixel becomes one RGB pixel:
//! `rgb = Σ_c latent_c · factor_c + bias`, mapped from [-1, 1] to [0, 255].
//!
//! **The factors.** A least-squares fit of the VAE's decoded colours to its
//! four latent channels, as the A1111 web UI ("Approx cheap") and ComfyUI's
//! `latent_rgb_factors` use them: one set for the SD 1.x/2.x VAE, another for
//! SDXL's. Models with another number of latent channels get no preview.
//!
//! **Size.** The projected latents are resampled to
//! [`kiln_domain::preview::WIDTH`] pixels wide (an area average when
//! shrinking, the nearest latent pixel when growing) and encoded as PNG.
//! Projection, resampling and encoding of a 64 × 64 preview are a few
//! thousand multiply-adds: nothing beside a UNet step.

use candle_core::{DType, Device, Tensor};
use kiln_domain::preview::{self, Preview};

/// The SD 1.x / 2.x VAE's latent-to-RGB factors, per latent channel (R, G, B).
const SD_FACTORS: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// The SDXL VAE's latent-to-RGB factors, per latent channel (R, G, B).
const SDXL_FACTORS: [[f32; 3]; 4] = [
    [0.3920, 0.4054, 0.4549],
    [-0.2634, -0.0196, 0.0653],
    [0.0568, 0.1687, -0.0755],
    [-0.3112, -0.2359, -0.2076],
];

/// Where previews go during a render, and how often.
pub struct PreviewSink<'a> {
    /// Denoising steps between previews (0: none), as
    /// [`kiln_domain::preview::due`] counts them.
    pub every: u32,
    /// Receives `(input index, preview)`.
    pub send: &'a mut dyn FnMut(usize, Preview),
}

/// A model family's projection of latents to RGB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LatentRgb {
    /// Per latent channel, its contribution to R, G and B.
    factors: [[f32; 3]; 4],
}

impl LatentRgb {
    /// Returns the projection of a model's family: SDXL's factors for a model
    /// with two text encoders, SD 1.x/2.x's otherwise; `None` unless its
    /// latents have 4 channels.
    pub(crate) fn for_family(sdxl: bool, latent_channels: usize) -> Option<Self> {
        (latent_channels == 4).then_some(Self {
            factors: if sdxl { SDXL_FACTORS } else { SD_FACTORS },
        })
    }

    /// Returns the RGB preview of `[1, 4, h, w]` latents: [`preview::WIDTH`]
    /// wide, `(width, height, pixels)`.
    ///
    /// # Errors
    /// When the tensor has another shape or cannot be read.
    pub(crate) fn project(&self, latents: &Tensor) -> candle_core::Result<(u32, u32, Vec<u8>)> {
        let (_, channels, h, w) = latents.dims4()?;
        if channels != self.factors.len() || h == 0 || w == 0 {
            return Err(candle_core::Error::Msg(format!(
                "a preview needs [1, {}, h, w] latents, got {:?}",
                self.factors.len(),
                latents.dims()
            )));
        }
        let values: Vec<f32> = latents
            .get(0)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let (out_w, out_h) = preview::size_for(w as u32, h as u32);
        let (out_w, out_h) = (out_w as usize, out_h as usize);
        let mut pixels = Vec::with_capacity(out_w * out_h * 3);
        for oy in 0..out_h {
            let (y0, y1) = span(oy, out_h, h);
            for ox in 0..out_w {
                let (x0, x1) = span(ox, out_w, w);
                let count = ((y1 - y0) * (x1 - x0)) as f32;
                let mut rgb = [0f32; 3];
                for (c, factor) in self.factors.iter().enumerate() {
                    let plane = &values[c * h * w..(c + 1) * h * w];
                    let mut sum = 0f32;
                    for y in y0..y1 {
                        sum += plane[y * w + x0..y * w + x1].iter().sum::<f32>();
                    }
                    let mean = sum / count;
                    for (out, f) in rgb.iter_mut().zip(factor) {
                        *out += mean * f;
                    }
                }
                pixels.extend(rgb.map(to_byte));
            }
        }
        Ok((out_w as u32, out_h as u32, pixels))
    }
}

/// Returns the source range `[start, end)` of output pixel `i` of `out`
/// along a side of `src` pixels: the pixels it covers when shrinking, the
/// nearest one when growing.
fn span(i: usize, out: usize, src: usize) -> (usize, usize) {
    let start = (i * src / out).min(src - 1);
    let end = ((i + 1) * src / out).clamp(start + 1, src);
    (start, end)
}

/// Maps a projected value from [-1, 1] to a byte.
fn to_byte(v: f32) -> u8 {
    (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Makes and sends the preview of input `index` after step `done` of
/// `total` when one is due; `scaled` returns the latents at unit scale. A
/// preview that cannot be made is logged and skipped: it never fails the render.
pub(crate) fn offer(
    sink: &mut PreviewSink<'_>,
    projection: Option<&LatentRgb>,
    index: usize,
    done: u32,
    total: u32,
    scaled: impl FnOnce() -> candle_core::Result<Tensor>,
) {
    let Some(projection) = projection else {
        return;
    };
    if !preview::due(sink.every, done, total) {
        return;
    }
    let made = scaled()
        .and_then(|latents| projection.project(&latents))
        .map_err(|e| e.to_string())
        .and_then(|(w, h, pixels)| preview::encode(w, h, pixels));
    match made {
        Ok(png) => (sink.send)(index, Preview { step: done, png }),
        Err(e) => tracing::warn!(error = %e, step = done, "cannot make a preview"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Latents whose every pixel holds `channels`.
    fn flat(channels: [f32; 4], h: usize, w: usize) -> Tensor {
        let mut v = Vec::new();
        for c in channels {
            v.extend(std::iter::repeat_n(c, h * w));
        }
        Tensor::from_vec(v, (1, 4, h, w), &Device::Cpu).unwrap()
    }

    #[test]
    fn known_latents_give_known_colours_64_wide() {
        let sd = LatentRgb::for_family(false, 4).unwrap();
        // Zero latents are mid grey.
        let (w, h, px) = sd.project(&flat([0.0; 4], 8, 8)).unwrap();
        assert_eq!((w, h), (64, 64));
        assert!(px.iter().all(|&b| b == 128));
        // Channel 0 at 1: (1 + factor) / 2 per colour.
        let (_, _, px) = sd.project(&flat([1.0, 0.0, 0.0, 0.0], 8, 8)).unwrap();
        assert_eq!(&px[..3], &[172, 157, 169]);
        // Channel 3 at 1 is dark blue-less: 0.5 - 0.7177 / 2 for blue.
        let (_, _, px) = sd.project(&flat([0.0, 0.0, 0.0, 1.0], 8, 8)).unwrap();
        assert_eq!(&px[..3], &[100, 94, 36]);
        // Far out of range clamps to black and white.
        let (_, _, px) = sd.project(&flat([9.0, 9.0, 0.0, 0.0], 8, 8)).unwrap();
        assert_eq!(&px[..3], &[255, 255, 255]);
        // SDXL's factors differ.
        let xl = LatentRgb::for_family(true, 4).unwrap();
        let (_, _, px) = xl.project(&flat([1.0, 0.0, 0.0, 0.0], 8, 8)).unwrap();
        assert_eq!(&px[..3], &[177, 179, 185]);
        assert_eq!(LatentRgb::for_family(false, 16), None);
    }

    #[test]
    fn wide_latents_shrink_by_area_and_keep_their_aspect() {
        // 128 × 64 latents (a 1024 × 512 image): two columns per pixel, left half
        // channel 0 at 1, right half at -1.
        let (h, w) = (64, 128);
        let mut v = vec![0f32; 4 * h * w];
        for y in 0..h {
            for x in 0..w {
                v[y * w + x] = if x < w / 2 { 1.0 } else { -1.0 };
            }
        }
        let t = Tensor::from_vec(v, (1, 4, h, w), &Device::Cpu).unwrap();
        let sd = LatentRgb::for_family(false, 4).unwrap();
        let (pw, ph, px) = sd.project(&t).unwrap();
        assert_eq!((pw, ph), (64, 32));
        assert_eq!(&px[..3], &[172, 157, 169]);
        let last = px.len() - 3;
        assert_eq!(&px[last..], &[83, 98, 86]);
    }

    #[test]
    fn previews_are_sent_when_due_as_png() {
        let sd = LatentRgb::for_family(false, 4).unwrap();
        let mut got = Vec::new();
        let mut send = |i: usize, p: Preview| got.push((i, p));
        let mut sink = PreviewSink {
            every: 2,
            send: &mut send,
        };
        for done in 1..=5 {
            offer(&mut sink, Some(&sd), 3, done, 5, || {
                Ok(flat([0.0; 4], 4, 8))
            });
        }
        offer(&mut sink, None, 3, 2, 5, || Ok(flat([0.0; 4], 4, 8)));
        let steps: Vec<(usize, u32)> = got.iter().map(|(i, p)| (*i, p.step)).collect();
        assert_eq!(steps, [(3, 2), (3, 4)]);
        assert_eq!(preview::check("preview", &got[0].1.png).unwrap(), 32);
    }

    #[test]
    fn a_render_with_previews_sends_them_and_renders_the_same_image() {
        let p = crate::tests::tiny();
        let r = kiln_domain::recipe::Recipe {
            scheduler: kiln_domain::recipe::Scheduler::Euler,
            steps: 6,
            ..crate::tests::recipe("a cat", 1)
        };
        let input = [crate::RenderInput::txt2img(&r)];
        let plain = p.render_batch(&input, &mut |_, _, _| true);
        let mut got = Vec::new();
        let mut send = |i: usize, p: Preview| got.push((i, p));
        let mut sink = PreviewSink {
            every: 2,
            send: &mut send,
        };
        let with = p.render_batch_with_previews(&input, &mut |_, _, _| true, &mut sink);
        let (plain, with) = match (&plain[0], &with[0]) {
            (Ok(a), Ok(b)) => (a, b),
            other => panic!("renders failed: {other:?}"),
        };
        assert_eq!(plain.image, with.image);
        let steps: Vec<(usize, u32)> = got.iter().map(|(i, p)| (*i, p.step)).collect();
        assert_eq!(steps, [(0, 2), (0, 4)]);
        for (_, p) in &got {
            assert_eq!(preview::check("preview", &p.png).unwrap(), 64);
        }
        assert_ne!(
            got[0].1.png, got[1].1.png,
            "the picture changes between steps"
        );
    }
}

/// The cost of previews, for the numbers in the README: run with
/// `cargo test --release -p kiln-diffusion --lib preview_cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use std::time::Instant;

    use super::*;

    #[test]
    #[ignore = "a measurement, not a check: prints timings"]
    fn preview_cost() {
        let p = crate::tests::tiny();
        let r = kiln_domain::recipe::Recipe {
            steps: 20,
            ..crate::tests::recipe("a cat", 1)
        };
        let input = [crate::RenderInput::txt2img(&r)];
        let time = |every: u32| {
            let mut sent = 0;
            let mut send = |_: usize, _: Preview| sent += 1;
            let mut sink = PreviewSink {
                every,
                send: &mut send,
            };
            let started = Instant::now();
            for _ in 0..10 {
                let out = p.render_batch_with_previews(&input, &mut |_, _, _| true, &mut sink);
                assert!(out[0].is_ok());
            }
            started.elapsed().as_secs_f64() / 10.0
        };
        // Alternate to spread noise from other processes over both.
        let (mut off, mut on) = (0.0, 0.0);
        for _ in 0..3 {
            off += time(0);
            on += time(5);
        }
        println!(
            "tiny model, 20 steps, 64 px: {:.2} ms without previews, {:.2} ms with one every 5 steps ({:+.2}%)",
            off / 3.0 * 1e3,
            on / 3.0 * 1e3,
            (on / off - 1.0) * 100.0
        );
        let sd = LatentRgb::for_family(false, 4).unwrap();
        for side in [32, 64, 128] {
            let latents = Tensor::randn(0f32, 1.0, (1, 4, side, side), &Device::Cpu).unwrap();
            let started = Instant::now();
            for _ in 0..100 {
                let (w, h, px) = sd.project(&latents).unwrap();
                preview::encode(w, h, px).unwrap();
            }
            println!(
                "one preview of {side}x{side} latents ({} px image): {:.3} ms",
                side * 8,
                started.elapsed().as_secs_f64() * 10.0
            );
        }
    }
}
