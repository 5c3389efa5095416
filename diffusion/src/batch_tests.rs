//! Batched renders give every task the bytes it gets alone.

use candle_core::Device;
use kiln_domain::recipe::Scheduler;

use super::img2img_tests::{left_half_mask, picture};
use super::tests::{TestResult, recipe};
use super::*;

/// Four txt2img recipes that differ in what a batch lets differ.
fn txt2img_recipes() -> Vec<Recipe> {
    let base = recipe("a red castle on a hill at sunset", 11);
    vec![
        base.clone(),
        Recipe {
            prompt: "portrait of an old (sailor:1.3), oil painting".into(),
            negative_prompt: "blurry".into(),
            seed: 12,
            guidance: 7.5,
            ..base.clone()
        },
        Recipe {
            prompt: "a misty forest BREAK morning light".into(),
            seed: 13,
            guidance: 3.0,
            ..base.clone()
        },
        Recipe {
            prompt: "a [quiet] harbour".into(),
            negative_prompt: String::new(),
            seed: 14,
            ..base.clone()
        },
        // Prompt editing and alternation: the conditioning changes between steps.
        Recipe {
            prompt: "a [red:(blue:1.2):2] castle [at dawn|at dusk]".into(),
            negative_prompt: "[blurry:dark:0.5]".into(),
            seed: 15,
            ..base
        },
    ]
}

/// Renders `inputs` one by one and as a batch; asserts every pair is identical.
fn assert_batch_matches(p: &Pipeline, label: &str, inputs: &[RenderInput<'_>]) -> TestResult {
    let alone = inputs
        .iter()
        .map(|input| p.render(input, &mut |_, _| true))
        .collect::<Result<Vec<_>, _>>()?;
    let batched = p.render_batch(inputs, &mut |_, _, _| true);
    assert_eq!(batched.len(), inputs.len());
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        let b = b?;
        assert!(*a == b.image, "{label}: task {i} differs in a batch");
        assert!(
            b.timings.denoise > std::time::Duration::ZERO
                && b.timings.decode > std::time::Duration::ZERO,
            "{label}: task {i} has no timings: {:?}",
            b.timings
        );
    }
    Ok(())
}

#[test]
fn batched_txt2img_is_byte_identical_for_every_architecture() -> TestResult {
    for kind in TinyKind::ALL {
        let dir = tempfile::tempdir()?;
        write_tiny_model_kind(dir.path(), kind)?;
        let p = Pipeline::load(dir.path(), &Device::Cpu)?;
        // Every sampler on SD 1.5 (Euler ancestral draws per-task noise, DPM-Solver++
        // keeps per-task history); DDIM with eta on the others.
        let samplers: &[(Scheduler, bool, f64)] = match kind {
            TinyKind::Sd15 => &[
                (Scheduler::Ddim, false, 0.0),
                (Scheduler::Euler, false, 0.0),
                (Scheduler::EulerA, true, 0.0),
                (Scheduler::DpmPp2m, false, 0.0),
            ],
            _ => &[(Scheduler::Ddim, false, 0.5)],
        };
        for &(scheduler, karras, eta) in samplers {
            let recipes: Vec<Recipe> = txt2img_recipes()
                .into_iter()
                .map(|r| Recipe {
                    scheduler,
                    karras,
                    eta,
                    ..r
                })
                .collect();
            let inputs: Vec<RenderInput<'_>> = recipes.iter().map(RenderInput::txt2img).collect();
            assert_batch_matches(&p, &format!("{kind} {scheduler}"), &inputs)?;
        }
        // Unguided tasks batch one row each.
        let unguided: Vec<Recipe> = txt2img_recipes()
            .into_iter()
            .map(|r| Recipe { guidance: 1.0, ..r })
            .collect();
        let inputs: Vec<RenderInput<'_>> = unguided.iter().map(RenderInput::txt2img).collect();
        assert_batch_matches(&p, &format!("{kind} unguided"), &inputs)?;
    }
    Ok(())
}

#[test]
fn batched_img2img_and_inpainting_are_byte_identical() -> TestResult {
    let inits = [
        picture(64, 64, 0),
        picture(64, 64, 60),
        picture(64, 64, 120),
    ];
    let mask = left_half_mask(64, 64);
    for kind in [TinyKind::Sd15, TinyKind::Inpaint] {
        let dir = tempfile::tempdir()?;
        write_tiny_model_kind(dir.path(), kind)?;
        let p = Pipeline::load(dir.path(), &Device::Cpu)?;
        let recipes: Vec<Recipe> = (0..3)
            .map(|i| Recipe {
                strength: 0.6,
                seed: 20 + i,
                init_image: Some("0".repeat(64)),
                ..recipe("a stone bridge", 0)
            })
            .collect();
        let img2img: Vec<RenderInput<'_>> = recipes
            .iter()
            .zip(&inits)
            .map(|(r, init)| RenderInput {
                recipe: r,
                init_image: Some(init),
                mask: None,
                controls: &[],
            })
            .collect();
        assert_batch_matches(&p, &format!("{kind} img2img"), &img2img)?;
        let inpaint: Vec<RenderInput<'_>> = img2img
            .iter()
            .map(|i| RenderInput {
                mask: Some(&mask),
                ..*i
            })
            .collect();
        assert_batch_matches(&p, &format!("{kind} inpaint"), &inpaint)?;
    }
    Ok(())
}

#[test]
fn a_task_cancelled_in_a_batch_stops_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let p = Pipeline::load(dir.path(), &Device::Cpu)?;
    let recipes = txt2img_recipes();
    let inputs: Vec<RenderInput<'_>> = recipes.iter().map(RenderInput::txt2img).collect();
    let mut progress = vec![Vec::new(); inputs.len()];
    let results = p.render_batch(&inputs, &mut |i, done, total| {
        progress[i].push((done, total));
        !(i == 1 && done == 2)
    });
    assert!(matches!(results[1], Err(PipelineError::Cancelled)));
    assert_eq!(progress[1], [(1, 4), (2, 4)]);
    for i in [0, 2, 3] {
        assert_eq!(progress[i], [(1, 4), (2, 4), (3, 4), (4, 4)], "task {i}");
        let alone = p.render(&inputs[i], &mut |_, _| true)?;
        assert!(
            results[i].as_ref().is_ok_and(|b| b.image == alone),
            "task {i}"
        );
    }
    Ok(())
}
