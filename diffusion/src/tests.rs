//! End-to-end tests: write the tiny model, load it through the real loader, render.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::Device;
use kiln_domain::recipe::Scheduler;
use sha2::Digest;

use super::*;

pub(super) type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The tiny model, written and loaded once per test binary. Loading copies every
/// tensor out of the files, so the folder can go away afterwards.
pub(super) fn tiny() -> &'static Pipeline {
    static TINY: OnceLock<Pipeline> = OnceLock::new();
    TINY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        write_tiny_model(dir.path()).expect("tiny model writes");
        Pipeline::load(dir.path(), &Device::Cpu).expect("tiny model loads")
    })
}

/// A 64 px, 4-step, guided DDIM recipe.
pub(super) fn recipe(prompt: &str, seed: u64) -> Recipe {
    Recipe {
        model: "tiny".into(),
        model_hash: String::new(),
        prompt: prompt.into(),
        negative_prompt: "blurry, low quality".into(),
        seed,
        steps: 4,
        guidance: 5.0,
        width: 64,
        height: 64,
        scheduler: Scheduler::Ddim,
        karras: false,
        eta: 0.0,
        strength: 1.0,
        init_image: None,
        mask: None,
        noise_seed: None,
        extras: Default::default(),
    }
}

pub(super) fn render(pipeline: &Pipeline, recipe: &Recipe) -> Result<RgbImage, PipelineError> {
    pipeline.txt2img(recipe, &mut |_, _| true)
}

/// Mean absolute difference per byte.
pub(super) fn distance(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: u64 = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    sum as f64 / a.pixels.len() as f64
}

#[test]
fn renders_a_deterministic_image_that_follows_seed_and_prompt() -> TestResult {
    let pipeline = tiny();
    let base = render(pipeline, &recipe("a red castle on a hill at sunset", 42))?;
    assert_eq!(
        (base.width, base.height, base.pixels.len()),
        (64, 64, 64 * 64 * 3)
    );

    let again = render(pipeline, &recipe("a red castle on a hill at sunset", 42))?;
    assert!(base == again, "same recipe, different pixels");

    let other_seed = render(pipeline, &recipe("a red castle on a hill at sunset", 43))?;
    let other_prompt = render(
        pipeline,
        &recipe("portrait of an old man, oil painting", 42),
    )?;
    let (d_seed, d_prompt) = (distance(&base, &other_seed), distance(&base, &other_prompt));
    println!("mean |difference| per byte: other seed {d_seed:.1}, other prompt {d_prompt:.1}");
    assert!(
        d_seed > 5.0,
        "a new seed barely changes the image: {d_seed}"
    );
    assert!(
        d_prompt > 10.0,
        "a new prompt barely changes the image: {d_prompt}"
    );
    Ok(())
}

#[test]
fn image_is_neither_flat_nor_saturated() -> TestResult {
    let image = render(tiny(), &recipe("a misty forest in the morning", 7))?;
    let n = image.pixels.len() as f64;
    let mean = image.pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / n;
    let var = image
        .pixels
        .iter()
        .map(|&p| (f64::from(p) - mean).powi(2))
        .sum::<f64>()
        / n;
    let clipped = image.pixels.iter().filter(|&&p| p == 0 || p == 255).count() as f64 / n;
    println!(
        "pixel mean {mean:.1}, std {:.1}, clipped {:.1}%",
        var.sqrt(),
        clipped * 100.0
    );
    assert!(
        var.sqrt() > 10.0,
        "nearly constant image: std {}",
        var.sqrt()
    );
    assert!((40.0..215.0).contains(&mean), "mean {mean}");
    assert!(clipped < 0.25, "{:.0}% of values clipped", clipped * 100.0);
    Ok(())
}

#[test]
fn long_prompts_are_chunked_not_truncated() -> TestResult {
    let pipeline = tiny();
    // 76 one-letter words (151 characters): each is one token in the tiny vocabulary,
    // so the first 75 words are exactly the first window's 75 prompt tokens.
    let words: Vec<String> = (0..76u8)
        .map(|i| char::from(b'a' + i % 26).to_string())
        .collect();
    let long = words.join(" ");
    let truncated = words[..75].join(" ");
    assert!(long.len() >= 150);
    let ids = pipeline.text.token_ids(&long)?;
    assert_eq!(ids.len(), 76);
    assert_eq!(pipeline.text.token_ids(&truncated)?, ids[..75]);

    let context = pipeline.text.encode(&long, Some(""))?.context;
    assert_eq!(context.dims(), [2, 2 * 77, 32]);

    let full = render(pipeline, &recipe(&long, 5))?;
    let cut = render(pipeline, &recipe(&truncated, 5))?;
    assert!(full != cut, "the 76th token had no effect");
    Ok(())
}

#[test]
fn guidance_of_one_or_less_uses_the_prompt_alone() -> TestResult {
    let pipeline = tiny();
    let mut r = recipe("a blue river", 9);
    r.guidance = 1.0;
    let unguided = render(pipeline, &r)?;
    r.negative_prompt = "something else entirely".into();
    assert!(
        render(pipeline, &r)? == unguided,
        "the negative prompt leaked into an unguided render"
    );
    r.guidance = 7.5;
    assert!(render(pipeline, &r)? != unguided);
    Ok(())
}

#[test]
fn on_step_reports_every_step_and_can_cancel() -> TestResult {
    let pipeline = tiny();
    let mut seen = Vec::new();
    pipeline.txt2img(&recipe("a dog", 1), &mut |done, total| {
        seen.push((done, total));
        true
    })?;
    assert_eq!(seen, [(1, 4), (2, 4), (3, 4), (4, 4)]);

    let mut calls = 0;
    let result = pipeline.txt2img(&recipe("a dog", 1), &mut |done, _| {
        calls += 1;
        done < 2
    });
    assert!(
        matches!(result, Err(PipelineError::Cancelled)),
        "{result:?}"
    );
    assert_eq!(calls, 2);
    Ok(())
}

#[test]
fn sides_must_be_multiples_of_eight() {
    let mut r = recipe("a cat", 1);
    r.width = 100;
    let err = render(tiny(), &r).err();
    assert!(
        matches!(&err, Some(PipelineError::InvalidRecipe { field: "width", message }) if message.contains("100")),
        "{err:?}"
    );
}

/// Rewrites one safetensors file of a model folder through `edit`.
fn edit_weights(
    file: &Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, candle_core::Tensor>),
) -> TestResult {
    let mut tensors = candle_core::safetensors::load(file, &Device::Cpu)?;
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, file)?;
    Ok(())
}

#[test]
fn a_missing_tensor_names_file_and_tensor() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let file = dir.path().join(layout::UNET_WEIGHTS);
    let name = "mid_block.resnets.0.conv1.weight";
    edit_weights(&file, |t| {
        t.remove(name);
    })?;
    match Pipeline::load(dir.path(), &Device::Cpu) {
        Err(err @ PipelineError::Weights { .. }) => {
            let PipelineError::Weights { file: at, message } = &err else {
                unreachable!()
            };
            assert_eq!(at, &file);
            assert!(message.contains(name), "{message}");
            let text = err.to_string();
            assert!(
                text.contains("unet/diffusion_pytorch_model.safetensors") && text.contains(name),
                "{text}"
            );
        }
        Err(other) => panic!("expected a Weights error, got {other}"),
        Ok(_) => panic!("loaded a model with a missing tensor"),
    }
    Ok(())
}

#[test]
fn a_misshapen_tensor_names_file_tensor_and_shapes() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let file = dir.path().join(layout::VAE_WEIGHTS);
    let name = "decoder.mid_block.attentions.0.to_k.weight";
    edit_weights(&file, |t| {
        if let Ok(wrong) =
            candle_core::Tensor::zeros((32, 31), candle_core::DType::F32, &Device::Cpu)
        {
            t.insert(name.into(), wrong);
        }
    })?;
    let err = Pipeline::load(dir.path(), &Device::Cpu).err();
    let Some(PipelineError::Weights { file: at, message }) = &err else {
        panic!("expected a Weights error, got {err:?}");
    };
    assert_eq!(at, &file);
    assert!(
        message.contains(name) && message.contains("[32, 31]"),
        "{message}"
    );
    Ok(())
}

#[test]
fn a_malformed_config_names_its_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let path = dir.path().join(layout::UNET_CONFIG);
    let text =
        std::fs::read_to_string(&path)?.replace("\"norm_num_groups\": 8", "\"norm_num_groups\": 5");
    std::fs::write(&path, text)?;
    let err = Pipeline::load(dir.path(), &Device::Cpu).err();
    assert!(
        matches!(&err, Some(PipelineError::Config { path: p, message }) if p == &path && message.contains("norm_num_groups")),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn vocab_and_merges_tokenize_like_tokenizer_json() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let from_json = tokenizers::Tokenizer::from_file(dir.path().join(layout::TOKENIZER_JSON))?;
    let built = text::clip_tokenizer(
        &dir.path().join(layout::TOKENIZER_VOCAB),
        &dir.path().join(layout::TOKENIZER_MERGES),
    )?;
    let prompts = [
        "a photo of a cat",
        "A  PHOTO\tof the Dog's house, 4k!!",
        "portrait of an old man, oil painting <|endoftext|> résumé 東京",
        "",
    ];
    for prompt in prompts {
        let a = from_json.encode(prompt, true)?;
        let b = built.encode(prompt, true)?;
        assert_eq!(a.get_ids(), b.get_ids(), "{prompt:?}");
        assert_eq!(a.get_tokens(), b.get_tokens(), "{prompt:?}");
    }
    let photo = from_json.encode("A  Photo of the CAT", false)?;
    assert_eq!(
        photo.get_tokens(),
        from_json.encode("a photo of the cat", false)?.get_tokens()
    );
    assert!(
        photo.get_tokens().iter().any(|t| t == "photo</w>"),
        "{:?}",
        photo.get_tokens()
    );
    let framed = from_json.encode("cat", true)?;
    let vocab = from_json.get_vocab_size(true) as u32;
    assert_eq!(framed.get_ids().first(), Some(&(vocab - 2)));
    assert_eq!(framed.get_ids().last(), Some(&(vocab - 1)));
    Ok(())
}

#[test]
fn a_folder_without_tokenizer_json_renders_the_same() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    std::fs::remove_file(dir.path().join(layout::TOKENIZER_JSON))?;
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
    let r = recipe("a golden lighthouse in a storm", 11);
    assert!(render(&pipeline, &r)? == render(tiny(), &r)?);
    // The hash covers the files read, which differ, so the hashes differ too.
    assert_ne!(pipeline.model_hash(), tiny().model_hash());
    Ok(())
}

#[test]
fn loaded_pipeline_reports_the_folder_hash() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
    assert_eq!(pipeline.model_hash(), model_hash(dir.path())?);
    // The tiny model is byte-identical everywhere, so its hash is too.
    assert_eq!(pipeline.model_hash(), tiny().model_hash());
    Ok(())
}

/// Prints the time of one 64 px, 4-step guided render and the image's hash (run with `--nocapture`).
#[test]
fn tiny_render_timing() -> TestResult {
    let pipeline = tiny();
    let r = recipe("a photo of a cat", 3);
    let image = render(pipeline, &r)?; // warm-up
    // Compare across machines and thread counts: the same recipe should give these bytes.
    println!(
        "tiny model image sha256: {}",
        hex::encode(sha2::Sha256::digest(&image.pixels))
    );
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        render(pipeline, &r)?;
    }
    let each = start.elapsed().as_secs_f64() / f64::from(runs);
    println!(
        "tiny model, 64x64, 4 steps, guidance 5: {:.3} s per render",
        each
    );
    Ok(())
}

/// Every sampler variant a recipe can name: (scheduler, karras, eta).
const SAMPLERS: [(Scheduler, bool, f64); 8] = [
    (Scheduler::Ddim, false, 0.0),
    (Scheduler::Ddim, false, 0.5),
    (Scheduler::Euler, false, 0.0),
    (Scheduler::Euler, true, 0.0),
    (Scheduler::EulerA, false, 0.0),
    (Scheduler::EulerA, true, 0.0),
    (Scheduler::DpmPp2m, false, 0.0),
    (Scheduler::DpmPp2m, true, 0.0),
];

/// The test recipe with another sampler.
fn sampler_recipe(seed: u64, (scheduler, karras, eta): (Scheduler, bool, f64)) -> Recipe {
    Recipe {
        scheduler,
        karras,
        eta,
        ..recipe("a lighthouse on a cliff, stormy sea", seed)
    }
}

/// Names a sampler variant as a batch file would.
fn sampler_name((scheduler, karras, eta): (Scheduler, bool, f64)) -> String {
    format!("{scheduler} karras={karras} eta={eta}")
}

#[test]
fn every_sampler_renders_the_same_pixels_twice_and_follows_the_seed() -> TestResult {
    let pipeline = tiny();
    let mut images = Vec::new();
    for sampler in SAMPLERS {
        let name = sampler_name(sampler);
        let r = sampler_recipe(21, sampler);
        r.validate("")?;
        let first = render(pipeline, &r)?;
        assert!(
            render(pipeline, &r)? == first,
            "{name}: same recipe, different pixels"
        );
        let other = render(pipeline, &sampler_recipe(22, sampler))?;
        let d = distance(&first, &other);
        println!("{name}: other seed differs by {d:.1} per byte");
        assert!(d > 2.0, "{name}: a new seed barely changes the image ({d})");
        images.push((name, first));
    }
    // The samplers really differ from each other (none silently falls back to another).
    for (i, (a, x)) in images.iter().enumerate() {
        for (b, y) in &images[i + 1..] {
            assert!(x != y, "{a} and {b} render the same pixels");
        }
    }
    Ok(())
}

#[test]
fn ancestral_noise_changes_the_image_but_not_its_reproducibility() -> TestResult {
    // DDIM with eta > 0 differs from eta = 0 only through the per-step noise, which
    // comes from the portable generator: same seed, same bytes.
    let pipeline = tiny();
    let deterministic = render(pipeline, &sampler_recipe(5, (Scheduler::Ddim, false, 0.0)))?;
    let noisy = sampler_recipe(5, (Scheduler::Ddim, false, 1.0));
    let image = render(pipeline, &noisy)?;
    assert!(image != deterministic, "eta = 1 added no noise");
    assert!(render(pipeline, &noisy)? == image);
    Ok(())
}

#[test]
fn turbo_style_euler_a_renders_in_one_and_four_steps() -> TestResult {
    let pipeline = tiny();
    for steps in [1, 4] {
        let r = Recipe {
            steps,
            guidance: 0.0,
            ..sampler_recipe(8, (Scheduler::EulerA, false, 0.0))
        };
        r.validate("")?;
        let mut seen = Vec::new();
        let image = pipeline.txt2img(&r, &mut |done, total| {
            seen.push((done, total));
            true
        })?;
        let want: Vec<(u32, u32)> = (1..=steps).map(|done| (done, steps)).collect();
        assert_eq!(seen, want);
        assert!(
            pipeline.txt2img(&r, &mut |_, _| true)? == image,
            "{steps} steps"
        );
        let other = render(
            pipeline,
            &Recipe {
                seed: 9,
                ..r.clone()
            },
        )?;
        assert!(
            distance(&image, &other) > 2.0,
            "{steps} steps: seed ignored"
        );
    }
    Ok(())
}

#[test]
fn a_sampler_the_recipe_cannot_use_is_an_invalid_recipe() {
    let mut r = recipe("a cat", 1);
    r.karras = true;
    let err = render(tiny(), &r).err();
    assert!(
        matches!(
            &err,
            Some(PipelineError::InvalidRecipe {
                field: "karras",
                ..
            })
        ),
        "{err:?}"
    );
    r.karras = false;
    r.scheduler = Scheduler::Euler;
    r.eta = 0.3;
    let err = render(tiny(), &r).err();
    assert!(
        matches!(
            &err,
            Some(PipelineError::InvalidRecipe { field: "eta", .. })
        ),
        "{err:?}"
    );
}

/// Environment variable that makes `print_sampler_image_hashes` the child of
/// `every_sampler_renders_the_same_bytes_in_another_process`.
const HASH_CHILD: &str = "KILN_SAMPLER_HASH_CHILD";

/// Returns one line per sampler variant: its name and the sha256 of its pixels.
fn sampler_hashes() -> Result<Vec<String>, PipelineError> {
    SAMPLERS
        .iter()
        .map(|&sampler| {
            let image = render(tiny(), &sampler_recipe(77, sampler))?;
            Ok(format!(
                "{}: {}",
                sampler_name(sampler),
                hex::encode(sha2::Sha256::digest(&image.pixels))
            ))
        })
        .collect()
}

/// Prints the image hash of every sampler (the child half of the cross-process test).
#[test]
fn print_sampler_image_hashes() -> TestResult {
    for line in sampler_hashes()? {
        println!("{HASH_CHILD} {line}");
    }
    Ok(())
}

#[test]
fn every_sampler_renders_the_same_bytes_in_another_process() -> TestResult {
    if std::env::var_os(HASH_CHILD).is_some() {
        return Ok(());
    }
    let output = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "tests::print_sampler_image_hashes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HASH_CHILD, "1")
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    // The harness may print "test ... " on the same line before the first one.
    let marker = format!("{HASH_CHILD} ");
    let theirs: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once(&marker).map(|(_, rest)| rest))
        .collect();
    let ours = sampler_hashes()?;
    assert_eq!(theirs, ours, "another process rendered different bytes");
    Ok(())
}

#[test]
fn f16_renders_deterministically_and_differs_from_f32() -> TestResult {
    for kind in TinyKind::ALL {
        let dir = tempfile::tempdir()?;
        write_tiny_model_kind(dir.path(), kind)?;
        let half = Pipeline::load_with(dir.path(), &Device::Cpu, Precision::F16)?;
        let full = Pipeline::load(dir.path(), &Device::Cpu)?;
        assert_eq!(
            (half.precision(), full.precision()),
            (Precision::F16, Precision::F32)
        );
        let r = recipe("a red castle on a (hill:1.2)", 42);
        let start = Instant::now();
        let a = render(&half, &r)?;
        let f16_time = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let b = render(&full, &r)?;
        let f32_time = start.elapsed().as_secs_f64();
        assert!(render(&half, &r)? == a, "{kind}: f16 is not deterministic");
        let d = distance(&a, &b);
        println!("{kind}: f16 {f16_time:.2} s, f32 {f32_time:.2} s, {d:.2} per byte apart");
        assert!(a != b, "{kind}: f16 rendered the f32 bytes");
        assert!(d < 40.0, "{kind}: f16 is far from f32 ({d})");
        // img2img runs in f16 too.
        let init = super::img2img_tests::picture(64, 64, 0);
        let i2i = Recipe {
            strength: 0.5,
            ..r.clone()
        };
        let input = RenderInput {
            recipe: &i2i,
            init_image: Some(&init),
            mask: None,
            controls: &[],
        };
        assert!(half.render(&input, &mut |_, _| true)? == half.render(&input, &mut |_, _| true)?);
    }
    Ok(())
}
