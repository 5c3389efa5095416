//! Pipeline-level tests of ControlNets and the hires fix on the tiny models at 64 px.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use kiln_domain::extras::{ControlNetRef, Hires, Preprocessor, ResizeMode, Upscaler};

use crate::img2img_tests::{left_half_mask, picture, png};
use crate::tests::{TestResult, recipe};
use crate::{
    Assets, Pipeline, PipelineError, Recipe, RenderInput, RgbImage, TinyControlNetLayout, TinyKind,
    write_tiny_controlnet, write_tiny_model_kind,
};

/// A tiny base model of `kind` holding the tiny ControlNets as `pose` (diffusers
/// folder), `pose-single` (original layout) and `xl` (the SDXL one).
struct Fixture {
    _dir: tempfile::TempDir,
    pipeline: Pipeline,
}

fn fixture(kind: TinyKind) -> Result<Fixture, Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_tiny_model_kind(&model, kind)?;
    let base = if kind == TinyKind::Sdxl {
        TinyKind::Sdxl
    } else {
        TinyKind::Sd15
    };
    let folder = dir.path().join("cn");
    let single = dir.path().join("single/control_tiny.safetensors");
    let xl = dir.path().join("cn-xl");
    write_tiny_controlnet(&folder, base, TinyControlNetLayout::Diffusers)?;
    write_tiny_controlnet(&single, base, TinyControlNetLayout::Original)?;
    write_tiny_controlnet(&xl, TinyKind::Sdxl, TinyControlNetLayout::Diffusers)?;
    let named: Vec<(String, PathBuf)> = vec![
        ("pose".into(), folder),
        ("pose-single".into(), single),
        ("xl".into(), xl),
    ];
    let mut pipeline = Pipeline::load(&model, &Device::Cpu)?;
    pipeline.set_assets(Arc::new(Assets::scan(&[], &[], &named)?));
    Ok(Fixture {
        _dir: dir,
        pipeline,
    })
}

/// A 64 px black picture with white strokes (a stick figure, `variant` moves it).
fn pose(variant: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        let (x, y) = (x as i32, y as i32);
        let v = variant as i32 * 6;
        let leg = (y - 60 + (x - 32 + v).abs() * 2).abs() <= 2 && y > 30;
        let body = (x - 32).abs() <= 1 && (10..=40).contains(&y);
        let arm = (y - 22).abs() <= 1 && (16 + v..=48 - v).contains(&x);
        if leg || body || arm {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    });
    png(image::DynamicImage::ImageRgb8(img))
}

fn control(model: &str, scale: f64) -> ControlNetRef {
    ControlNetRef {
        model: model.into(),
        hash: String::new(),
        image: String::new(),
        scale,
        start: 0.0,
        end: 1.0,
        resize: ResizeMode::Crop,
        preprocess: None,
    }
}

fn with_controls(base: &Recipe, controls: Vec<ControlNetRef>) -> Recipe {
    let mut r = base.clone();
    r.extras.controlnets = controls;
    r
}

fn render(p: &Pipeline, r: &Recipe, images: &[&[u8]]) -> Result<RgbImage, PipelineError> {
    let input = RenderInput {
        controls: images,
        ..RenderInput::txt2img(r)
    };
    p.render(&input, &mut |_, _| true)
}

#[test]
fn a_controlnet_changes_the_image_and_scale_zero_does_not() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let base = recipe("a knight", 5);
    let plain = render(p, &base, &[])?;
    let image = pose(0);
    let guided = render(
        p,
        &with_controls(&base, vec![control("pose", 1.0)]),
        &[&image],
    )?;
    let mean_diff = crate::tests::distance(&plain, &guided);
    assert!(
        mean_diff > 2.0,
        "the ControlNet barely changed the image: {mean_diff}"
    );
    let other = render(
        p,
        &with_controls(&base, vec![control("pose", 1.0)]),
        &[&pose(2)],
    )?;
    assert_ne!(other, guided, "another control image, another picture");
    let zero = render(
        p,
        &with_controls(&base, vec![control("pose", 0.0)]),
        &[&image],
    )?;
    assert_eq!(zero, plain, "scale 0 renders the bytes of no ControlNet");
    Ok(())
}

#[test]
fn loaded_controlnets_are_parts_with_bytes_that_an_owner_can_drop() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let base = recipe("a knight", 5);
    let image = pose(0);
    let guided = with_controls(
        &base,
        vec![
            control("pose", 1.0),
            control("pose-single", 0.5),
            control("xl", 0.0),
        ],
    );
    let images: [&[u8]; 3] = [&image, &image, &image];
    let input = RenderInput {
        controls: &images,
        ..RenderInput::txt2img(&guided)
    };
    let needed = p.parts_needed(std::slice::from_ref(&input));
    let labels: Vec<&str> = needed.iter().map(|n| n.label.as_str()).collect();
    assert_eq!(
        labels,
        ["ControlNet \"pose\"", "ControlNet \"pose-single\""],
        "scale 0 loads nothing"
    );
    let folder = &p.assets().controlnets["pose"];
    let weights = crate::inspect::file_bytes(&folder.path.join(super::WEIGHTS))?;
    assert!(weights > 0);
    assert_eq!(
        needed[0].bytes, weights,
        "the catalog's measure of its weights"
    );
    assert!(p.parts().is_empty(), "nothing is loaded before a render");

    let first = p.render(&input, &mut |_, _| true)?;
    let mut held = p.parts();
    held.sort();
    let mut expected: Vec<_> = needed.iter().map(|n| (n.part.clone(), n.bytes)).collect();
    expected.sort();
    assert_eq!(held, expected, "the render holds what was announced");

    assert!(p.drop_part(&needed[0].part));
    assert!(!p.drop_part(&needed[0].part), "dropped already");
    assert_eq!(p.parts(), [(needed[1].part.clone(), needed[1].bytes)]);
    let again = p.render(&input, &mut |_, _| true)?;
    assert_eq!(again, first, "loaded again, the same bytes");
    assert_eq!(p.parts().len(), 2);
    Ok(())
}

#[test]
fn two_controlnets_add() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let base = recipe("a knight", 6);
    let (a, b) = (pose(0), pose(2));
    let one = render(p, &with_controls(&base, vec![control("pose", 0.8)]), &[&a])?;
    let two = render(
        p,
        &with_controls(&base, vec![control("pose", 0.8), control("pose", 0.5)]),
        &[&a, &b],
    )?;
    assert_ne!(one, two);
    // The second with scale 0 is dropped: the first alone.
    let dropped = render(
        p,
        &with_controls(&base, vec![control("pose", 0.8), control("pose", 0.0)]),
        &[&a, &b],
    )?;
    assert_eq!(dropped, one);
    let err = render(
        p,
        &with_controls(&base, vec![control("pose", 0.8)]),
        &[&a, &b],
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("controlnets: 2 control images for 1 ControlNets")
    );
    Ok(())
}

#[test]
fn start_and_end_choose_the_steps() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let base = recipe("a knight", 7);
    let image = pose(1);
    let plain = render(p, &base, &[])?;
    let all = render(
        p,
        &with_controls(&base, vec![control("pose", 1.0)]),
        &[&image],
    )?;
    let window = |start: f64, end: f64| {
        let mut c = control("pose", 1.0);
        (c.start, c.end) = (start, end);
        render(p, &with_controls(&base, vec![c]), &[&image])
    };
    // Four steps: fractions 0, 0.25, 0.5, 0.75. None lies in [0.9, 1.0].
    assert_eq!(window(0.9, 1.0)?, plain);
    assert_eq!(window(0.0, 0.75)?, all);
    let late = window(0.5, 1.0)?;
    assert_ne!(late, plain);
    assert_ne!(late, all);
    Ok(())
}

#[test]
fn batched_renders_equal_unbatched_ones() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let images = [pose(0), pose(1), pose(2)];
    let recipes: Vec<Recipe> = (0..3)
        .map(|i| {
            with_controls(
                &recipe(&format!("a knight, pose {i}"), 20 + i),
                vec![control("pose", 0.6 + 0.2 * i as f64)],
            )
        })
        .collect();
    let slices: Vec<[&[u8]; 1]> = images.iter().map(|i| [i.as_slice()]).collect();
    let inputs: Vec<RenderInput<'_>> = recipes
        .iter()
        .zip(&slices)
        .map(|(r, s)| RenderInput {
            controls: s,
            ..RenderInput::txt2img(r)
        })
        .collect();
    let batched = p.render_batch(&inputs, &mut |_, _, _| true);
    for ((r, s), b) in recipes.iter().zip(&slices).zip(batched) {
        assert_eq!(b?.image, render(p, r, s)?);
    }
    Ok(())
}

#[test]
fn a_controlnet_for_another_base_is_refused_naming_the_tensor() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let image = pose(0);
    let err = render(
        p,
        &with_controls(&recipe("x", 1), vec![control("xl", 1.0)]),
        &[&image],
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        err.contains("cn-xl/diffusion_pytorch_model.safetensors: tensor down_blocks.0."),
        "{err}"
    );
    let err = render(
        p,
        &with_controls(&recipe("x", 1), vec![control("nope", 1.0)]),
        &[&image],
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("controlnets: [0]: no ControlNet named \"nope\" here")
    );
    Ok(())
}

#[test]
fn the_original_layout_renders_as_the_diffusers_layout() -> TestResult {
    for kind in [TinyKind::Sd15, TinyKind::Sdxl] {
        let f = fixture(kind)?;
        let p = &f.pipeline;
        let base = recipe("a knight", 8);
        let image = pose(0);
        let folder = render(
            p,
            &with_controls(&base, vec![control("pose", 1.0)]),
            &[&image],
        )?;
        let single = render(
            p,
            &with_controls(&base, vec![control("pose-single", 1.0)]),
            &[&image],
        )?;
        assert_eq!(folder, single, "{kind}");
        assert_ne!(folder, render(p, &base, &[])?, "{kind}");
    }
    Ok(())
}

#[test]
fn controlnets_work_with_img2img_inpainting_and_preprocessors() -> TestResult {
    for kind in [TinyKind::Sd15, TinyKind::Inpaint] {
        let f = fixture(kind)?;
        let p = &f.pipeline;
        let (init, mask) = (picture(64, 64, 1), left_half_mask(64, 64));
        let r = Recipe {
            strength: 0.75,
            ..recipe("a boat", 9)
        };
        let image = pose(1);
        for mask in [None, Some(mask.as_slice())] {
            let plain = p.render(
                &RenderInput {
                    init_image: Some(&init),
                    mask,
                    ..RenderInput::txt2img(&r)
                },
                &mut |_, _| true,
            )?;
            let cn = with_controls(&r, vec![control("pose", 1.0)]);
            let guided = p.render(
                &RenderInput {
                    init_image: Some(&init),
                    mask,
                    controls: &[&image],
                    ..RenderInput::txt2img(&cn)
                },
                &mut |_, _| true,
            )?;
            assert_ne!(plain, guided, "{kind}, mask {}", mask.is_some());
        }
    }
    // A preprocessor runs on the raw image: canny of a picture differs from the picture.
    let f = fixture(TinyKind::Sd15)?;
    let raw = picture(64, 64, 2);
    let mut c = control("pose", 1.0);
    let plain = render(
        &f.pipeline,
        &with_controls(&recipe("x", 3), vec![c.clone()]),
        &[&raw],
    )?;
    c.preprocess = Some(Preprocessor::Canny);
    let edges = render(
        &f.pipeline,
        &with_controls(&recipe("x", 3), vec![c]),
        &[&raw],
    )?;
    assert_ne!(plain, edges);
    Ok(())
}

fn hires(upscaler: Upscaler) -> Hires {
    Hires {
        scale: 2.0,
        steps: 3,
        denoise: 0.5,
        upscaler,
    }
}

#[test]
fn hires_fix_doubles_the_size_with_both_upscalers() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let base = recipe("a castle", 11);
    let mut outputs = Vec::new();
    for upscaler in [Upscaler::Latent, Upscaler::Lanczos] {
        let mut r = base.clone();
        r.extras.hires = Some(hires(upscaler));
        let mut progress = Vec::new();
        let out = p.render(&RenderInput::txt2img(&r), &mut |done, total| {
            progress.push((done, total));
            true
        })?;
        assert_eq!((out.width, out.height), (128, 128), "{upscaler:?}");
        assert_eq!(out.pixels.len(), 128 * 128 * 3);
        // 4 first-pass steps, then the last of 3 (denoise 0.5 starts at 3 - floor(1.5) = 2).
        assert_eq!(progress.first(), Some(&(1, 7)));
        assert_eq!(progress.last(), Some(&(7, 7)));
        outputs.push(out);
        // With a ControlNet, its image refitted to 128 px: another picture.
        let cn = with_controls(&r, vec![control("pose", 1.0)]);
        let guided = render(p, &cn, &[&pose(0)])?;
        assert_eq!((guided.width, guided.height), (128, 128));
        assert_ne!(guided, outputs[outputs.len() - 1]);
    }
    assert_ne!(outputs[0], outputs[1], "the upscalers differ");
    // Batched with a plain render: the same bytes.
    let mut r = base.clone();
    r.extras.hires = Some(hires(Upscaler::Latent));
    let other = recipe("a castle", 12);
    let batch = p.render_batch(
        &[RenderInput::txt2img(&r), RenderInput::txt2img(&other)],
        &mut |_, _, _| true,
    );
    let mut batch = batch.into_iter();
    assert_eq!(batch.next().ok_or("one")??.image, outputs[0]);
    assert_eq!(batch.next().ok_or("two")??.image, render(p, &other, &[])?);
    Ok(())
}

#[test]
fn hires_with_a_mask_is_refused() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let mut r = recipe("x", 1);
    r.extras.hires = Some(hires(Upscaler::Latent));
    let (init, mask) = (picture(64, 64, 1), left_half_mask(64, 64));
    let err = f
        .pipeline
        .render(
            &RenderInput {
                init_image: Some(&init),
                mask: Some(&mask),
                ..RenderInput::txt2img(&r)
            },
            &mut |_, _| true,
        )
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("hires: the hires fix does not run with a mask")
    );
    Ok(())
}

#[test]
fn the_original_names_map_both_ways() -> TestResult {
    let dir = tempfile::tempdir()?;
    for base in [TinyKind::Sd15, TinyKind::Sdxl] {
        let folder = dir.path().join(format!("{base}"));
        let single = dir.path().join(format!("{base}.safetensors"));
        write_tiny_controlnet(&folder, base, TinyControlNetLayout::Diffusers)?;
        write_tiny_controlnet(&single, base, TinyControlNetLayout::Original)?;
        let a = candle_core::safetensors::load(folder.join(super::WEIGHTS), &Device::Cpu)?;
        let b = candle_core::safetensors::load(&single, &Device::Cpu)?;
        assert_eq!(a.len(), b.len());
        assert!(b.keys().all(|k| k.starts_with("control_model.")));
        for expected in [
            "control_model.input_hint_block.14.weight",
            "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.weight",
            "control_model.input_blocks.1.0.in_layers.0.weight",
            "control_model.middle_block.1.proj_in.weight",
            "control_model.time_embed.2.bias",
        ] {
            assert!(b.contains_key(expected), "{base}: no {expected}");
        }
        if base == TinyKind::Sdxl {
            assert!(b.contains_key("control_model.label_emb.0.0.weight"));
        }
    }
    Ok(())
}

/// Writes the tiny SD 1.5 and SDXL models with their tiny ControlNets, and kiln's
/// ControlNet residuals and UNet prediction with them on fixed inputs, to
/// `$KILN_PARITY_DIR/controlnet-{sd15,sdxl}` for `scripts/diffusers_parity.py`.
/// Run by hand: `KILN_PARITY_DIR=/tmp/parity cargo test -p kiln-diffusion
/// dump_controlnet_for_diffusers -- --ignored`.
#[test]
#[ignore = "writes reference files for diffusers_parity.py; needs KILN_PARITY_DIR"]
fn dump_controlnet_for_diffusers_parity() -> TestResult {
    use candle_core::{DType, Tensor};

    use crate::noise::{self, Purpose};

    let root = PathBuf::from(std::env::var("KILN_PARITY_DIR")?);
    for kind in [TinyKind::Sd15, TinyKind::Sdxl] {
        let dir = root.join(format!("controlnet-{kind}"));
        std::fs::create_dir_all(&dir)?;
        write_tiny_model_kind(&dir, kind)?;
        let cn_dir = dir.join("controlnet");
        write_tiny_controlnet(&cn_dir, kind, TinyControlNetLayout::Diffusers)?;
        let p = Pipeline::load(&dir, &Device::Cpu)?;
        let net = super::load(&cn_dir, &p.unet_config, DType::F32, &Device::Cpu)?;
        let cond = p.conditioning("a red castle on a hill at sunset", Some("blurry"), 8, 8)?;
        let latents = Tensor::from_vec(
            noise::standard_normal(7, Purpose::InitialLatents, 0, 2 * 4 * 8 * 8),
            (2, 4, 8, 8),
            &Device::Cpu,
        )?;
        let picture = image::load_from_memory(&pose(1))?.to_rgb8();
        let values: Vec<f32> = picture
            .as_raw()
            .iter()
            .map(|&v| f32::from(v) / 255.0)
            .collect();
        let one = Tensor::from_vec(values, (64, 64, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        let image = Tensor::cat(&[&one, &one], 0)?.contiguous()?;
        let scale_value = 0.7f32;
        let scale = Tensor::from_vec(vec![scale_value; 2], (2, 1, 1, 1), &Device::Cpu)?;
        let timestep = 537.0;
        let residuals = net.forward(&latents, timestep, &cond, 2, &image, &scale)?;
        let prediction =
            p.unet
                .forward_with_residuals(&latents, timestep, &cond, 2, Some(&residuals))?;
        let mut out = std::collections::HashMap::new();
        for (i, r) in residuals.down.iter().enumerate() {
            out.insert(format!("down_{i}"), r.clone());
        }
        out.insert("mid".to_string(), residuals.mid.clone());
        out.insert("prediction".to_string(), prediction);
        out.insert(
            "plain_prediction".to_string(),
            p.unet.forward(&latents, timestep, &cond)?,
        );
        out.insert("latents".to_string(), latents);
        out.insert("image".to_string(), image);
        out.insert(
            "scale".to_string(),
            Tensor::new(&[scale_value], &Device::Cpu)?,
        );
        out.insert(
            "timestep".to_string(),
            Tensor::new(&[timestep as f32], &Device::Cpu)?,
        );
        out.insert("context".to_string(), cond.context);
        if let Some(added) = cond.added {
            out.insert("text_embeds".to_string(), added.text_embeds);
            out.insert("time_ids".to_string(), added.time_ids);
        }
        candle_core::safetensors::save(&out, dir.join("kiln_controlnet_outputs.safetensors"))?;
    }
    Ok(())
}

#[test]
fn both_layouts_load_every_tensor_of_their_files() -> TestResult {
    let dir = tempfile::tempdir()?;
    for base in [TinyKind::Sd15, TinyKind::Sdxl] {
        let model = dir.path().join(format!("model-{base}"));
        write_tiny_model_kind(&model, base)?;
        let p = Pipeline::load(&model, &Device::Cpu)?;
        let folder = dir.path().join(format!("cn-{base}"));
        let single = dir.path().join(format!("cn-{base}.safetensors"));
        write_tiny_controlnet(&folder, base, TinyControlNetLayout::Diffusers)?;
        write_tiny_controlnet(&single, base, TinyControlNetLayout::Original)?;
        for path in [&folder, &single] {
            crate::weights::usage::take();
            super::load(path, &p.unet_config, candle_core::DType::F32, &Device::Cpu)?;
            let log = crate::weights::usage::take();
            assert_eq!(log.len(), 1, "{}", path.display());
            for (file, served, present) in log {
                assert!(!present.is_empty());
                let never: Vec<_> = present.difference(&served).collect();
                assert!(never.is_empty(), "{}: never read {never:?}", file.display());
            }
        }
    }
    Ok(())
}
