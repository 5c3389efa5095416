//! img2img and inpainting, end to end on the tiny models.

use candle_core::Device;
use kiln_domain::recipe::Scheduler;

use super::tests::{TestResult, distance, recipe, tiny};
use super::*;

/// Encodes an image as PNG.
pub(super) fn png(img: image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encodes");
    out.into_inner()
}

/// A `w` × `h` picture: a diagonal gradient with a bright square, shifted by `variant`.
pub(super) fn picture(w: u32, h: u32, variant: u8) -> Vec<u8> {
    png(image::RgbImage::from_fn(w, h, |x, y| {
        let square = (16..40).contains(&x) && (20..44).contains(&y);
        let v = ((x + y) * 2) as u8;
        image::Rgb(if square {
            [250, 240 - variant, 30 + variant]
        } else {
            [v, 255 - v, variant]
        })
    })
    .into())
}

/// A mask repainting the left half (white) and keeping the right half (black).
pub(super) fn left_half_mask(w: u32, h: u32) -> Vec<u8> {
    png(
        image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < w / 2 { 255 } else { 0 }]))
            .into(),
    )
}

/// The test recipe as img2img at `strength`.
fn img2img_recipe(seed: u64, strength: f64) -> Recipe {
    Recipe {
        strength,
        init_image: Some("0".repeat(64)),
        ..recipe("a lighthouse on a cliff", seed)
    }
}

/// Renders with an init image (and a mask).
fn render_with(
    p: &Pipeline,
    r: &Recipe,
    init: &[u8],
    mask: Option<&[u8]>,
) -> Result<RgbImage, PipelineError> {
    let input = RenderInput {
        recipe: r,
        init_image: Some(init),
        mask,
        controls: &[],
    };
    p.render(&input, &mut |_, _| true)
}

/// Decodes the PNG bytes the tests build to RGB pixels.
fn pixels(bytes: &[u8]) -> Result<RgbImage, PipelineError> {
    images::init_image(bytes, 64, 64)
}

#[test]
fn strength_zero_returns_the_vae_round_trip_of_the_init_image() -> TestResult {
    let p = tiny();
    let init = picture(64, 64, 0);
    let mut steps = 0;
    let out = p.render(
        &RenderInput {
            recipe: &img2img_recipe(1, 0.0),
            init_image: Some(&init),
            mask: None,
            controls: &[],
        },
        &mut |_, _| {
            steps += 1;
            true
        },
    )?;
    assert_eq!(steps, 0, "strength 0 leaves nothing to denoise");
    let original = pixels(&init)?;
    let tensor = images::to_tensor(&original, &Device::Cpu)?;
    let round_trip = p.decode(&p.encode(&tensor)?)?;
    assert!(out == round_trip, "strength 0 is not the VAE round trip");
    // The tiny VAE has random weights, so its round trip is far from the picture;
    // a real VAE's is close. The render must equal the round trip exactly.
    println!(
        "round trip vs init image: {:.1} per byte (random tiny VAE)",
        distance(&round_trip, &original)
    );
    Ok(())
}

#[test]
fn strength_one_ignores_the_init_image() -> TestResult {
    let p = tiny();
    for scheduler in [Scheduler::Ddim, Scheduler::EulerA, Scheduler::DpmPp2m] {
        let r = Recipe {
            scheduler,
            ..img2img_recipe(2, 1.0)
        };
        let txt2img = p.txt2img(
            &Recipe {
                init_image: None,
                ..r.clone()
            },
            &mut |_, _| true,
        )?;
        for variant in [0, 90] {
            let image = render_with(p, &r, &picture(64, 64, variant), None)?;
            assert!(
                image == txt2img,
                "{scheduler}: strength 1 used the init image"
            );
        }
    }
    Ok(())
}

#[test]
fn half_strength_follows_the_init_image_and_reproduces() -> TestResult {
    let p = tiny();
    let (a, b) = (picture(64, 64, 0), picture(64, 64, 120));
    for scheduler in [
        Scheduler::Ddim,
        Scheduler::Euler,
        Scheduler::EulerA,
        Scheduler::DpmPp2m,
    ] {
        let r = Recipe {
            scheduler,
            steps: 6,
            ..img2img_recipe(3, 0.5)
        };
        let mut seen = Vec::new();
        let from_a = p.render(
            &RenderInput {
                recipe: &r,
                init_image: Some(&a),
                mask: None,
                controls: &[],
            },
            &mut |done, total| {
                seen.push((done, total));
                true
            },
        )?;
        assert_eq!(
            seen,
            [(4, 6), (5, 6), (6, 6)],
            "{scheduler}: steps 4 to 6 run"
        );
        let again = render_with(p, &r, &a, None)?;
        let from_b = render_with(p, &r, &b, None)?;
        let other_seed = render_with(
            p,
            &Recipe {
                seed: 4,
                ..r.clone()
            },
            &a,
            None,
        )?;
        let d = distance(&from_a, &from_b);
        println!("{scheduler}: init images 0 and 120 differ by {d:.1} per byte at strength 0.5");
        assert!(from_a == again, "{scheduler}: img2img is not reproducible");
        assert!(d > 1.0, "{scheduler}: the init image barely matters ({d})");
        assert!(from_a != other_seed, "{scheduler}: the seed is ignored");
    }
    Ok(())
}

#[test]
fn init_images_of_another_size_are_resized() -> TestResult {
    let p = tiny();
    let image = render_with(p, &img2img_recipe(5, 0.6), &picture(100, 70, 0), None)?;
    assert_eq!((image.width, image.height), (64, 64));
    Ok(())
}

#[test]
fn unusable_images_are_invalid_recipes_naming_the_field() {
    let p = tiny();
    let r = img2img_recipe(1, 0.5);
    let garbage = b"definitely not a PNG".as_slice();
    let truncated = &picture(64, 64, 0)[..60];
    for (init, mask, field) in [
        (garbage, None, "init_image"),
        (truncated, None, "init_image"),
        (&picture(64, 64, 0)[..], Some(garbage), "mask"),
    ] {
        let err = render_with(p, &r, init, mask).err();
        assert!(
            matches!(&err, Some(PipelineError::InvalidRecipe { field: f, .. }) if *f == field),
            "{field}: {err:?}"
        );
    }
    let mask = left_half_mask(64, 64);
    let err = p
        .render(
            &RenderInput {
                recipe: &r,
                init_image: None,
                mask: Some(&mask),
                controls: &[],
            },
            &mut |_, _| true,
        )
        .err();
    assert!(
        matches!(
            &err,
            Some(PipelineError::InvalidRecipe { field: "mask", .. })
        ),
        "{err:?}"
    );
}

/// Max and mean absolute difference over the kept (right) half of two 64 × 64 images,
/// and the mean over the repainted (left) half.
fn halves(a: &RgbImage, b: &RgbImage) -> (u8, f64, f64) {
    let (mut max, mut kept, mut painted) = (0u8, 0u64, 0u64);
    for (i, (x, y)) in a.pixels.iter().zip(&b.pixels).enumerate() {
        let d = x.abs_diff(*y);
        if (i / 3) % 64 >= 32 {
            max = max.max(d);
            kept += u64::from(d);
        } else {
            painted += u64::from(d);
        }
    }
    let half = (a.pixels.len() / 2) as f64;
    (max, kept as f64 / half, painted as f64 / half)
}

#[test]
fn inpainting_keeps_the_unmasked_pixels_of_the_init_image() -> TestResult {
    let init = picture(64, 64, 0);
    let original = pixels(&init)?;
    let mask = left_half_mask(64, 64);
    for kind in [TinyKind::Sd15, TinyKind::Inpaint] {
        let dir = tempfile::tempdir()?;
        write_tiny_model_kind(dir.path(), kind)?;
        let p = Pipeline::load(dir.path(), &Device::Cpu)?;
        for strength in [1.0, 0.75] {
            let r = img2img_recipe(6, strength);
            let out = render_with(&p, &r, &init, Some(&mask))?;
            let (max, kept, painted) = halves(&out, &original);
            println!(
                "{kind} strength {strength}: kept half differs by max {max}, mean {kept:.2}; repainted half by {painted:.1}"
            );
            // Tolerance 0: the kept pixels are the init image's, byte for byte.
            assert_eq!(max, 0, "{kind}: unmasked pixels changed");
            assert!(painted > 1.0, "{kind}: the masked half was not repainted");
            assert!(
                render_with(&p, &r, &init, Some(&mask))? == out,
                "{kind}: not reproducible"
            );
            let other = render_with(
                &p,
                &Recipe {
                    seed: 7,
                    ..r.clone()
                },
                &init,
                Some(&mask),
            )?;
            assert!(other != out, "{kind}: the seed is ignored");
        }
        if kind == TinyKind::Inpaint {
            // The inpainting UNet sees the masked image: another picture outside the
            // mask changes what it paints inside.
            let other_init = picture(64, 64, 120);
            let a = render_with(&p, &img2img_recipe(6, 1.0), &init, Some(&mask))?;
            let b = render_with(&p, &img2img_recipe(6, 1.0), &other_init, Some(&mask))?;
            let (_, _, painted) = halves(&a, &b);
            assert!(painted > 0.0, "the masked-image latents have no effect");
        }
    }
    Ok(())
}
