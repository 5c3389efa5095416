//! End-to-end tests: write the tiny model, load it through the real loader, render.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::Device;
use sha2::Digest;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The tiny model, written and loaded once per test binary. Loading copies every
/// tensor out of the files, so the folder can go away afterwards.
fn tiny() -> &'static Pipeline {
    static TINY: OnceLock<Pipeline> = OnceLock::new();
    TINY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        write_tiny_model(dir.path()).expect("tiny model writes");
        Pipeline::load(dir.path(), &Device::Cpu).expect("tiny model loads")
    })
}

/// A 64 px, 4-step, guided DDIM recipe.
fn recipe(prompt: &str, seed: u64) -> Recipe {
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
    }
}

fn render(pipeline: &Pipeline, recipe: &Recipe) -> Result<RgbImage, PipelineError> {
    pipeline.txt2img(recipe, &mut |_, _| true)
}

/// Mean absolute difference per byte.
fn distance(a: &RgbImage, b: &RgbImage) -> f64 {
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
