//! Tests across architectures: every tiny kind loads through `Pipeline::load`, reads exactly
//! the tensors in its files, and renders; SDXL's conditioning is live; bad folders are refused.

use kiln_domain::recipe::Scheduler;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A 64 px, 3-step, guided DDIM recipe.
fn recipe(prompt: &str, seed: u64) -> Recipe {
    Recipe {
        model: "tiny".into(),
        model_hash: String::new(),
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        seed,
        steps: 3,
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

/// Writes the tiny model of `kind` into a fresh folder.
fn write(kind: TinyKind) -> Result<tempfile::TempDir, Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    write_tiny_model_kind(dir.path(), kind)?;
    Ok(dir)
}

/// Returns the names of the tensors in a safetensors file.
fn tensor_names(file: &Path) -> Result<BTreeSet<String>, candle_core::Error> {
    Ok(candle_core::safetensors::load(file, &Device::Cpu)?
        .into_keys()
        .collect())
}

#[test]
fn the_loader_reads_exactly_the_tensors_in_the_files() -> TestResult {
    for kind in TinyKind::ALL {
        let dir = write(kind)?;
        weights::usage::take();
        Pipeline::load(dir.path(), &Device::Cpu)?;
        let log = weights::usage::take();
        let mut by_file = BTreeMap::new();
        for (file, served, present) in log {
            let rel = file
                .strip_prefix(dir.path())?
                .to_string_lossy()
                .into_owned();
            // Compare with the file itself, not only with what the backend saw.
            assert_eq!(present, tensor_names(&file)?, "{kind} {rel}");
            let missing: Vec<_> = present.difference(&served).collect();
            let extra: Vec<_> = served.difference(&present).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{kind} {rel}: never read {missing:?}, read but absent {extra:?}"
            );
            by_file.insert(rel, served.len());
        }
        let mut expected = vec![
            layout::TEXT_ENCODER_WEIGHTS.to_string(),
            layout::UNET_WEIGHTS.to_string(),
            layout::VAE_WEIGHTS.to_string(),
        ];
        if kind == TinyKind::Sdxl {
            expected.push(layout::TEXT_2.weights());
            let unet = tensor_names(&dir.path().join(layout::UNET_WEIGHTS))?;
            assert!(unet.contains("add_embedding.linear_1.weight"));
        }
        expected.sort();
        let built: Vec<_> = by_file.keys().cloned().collect();
        assert_eq!(built, expected, "{kind}: every weights file is built once");
        println!("{kind}: tensors read per file {by_file:?}");
    }
    Ok(())
}

#[test]
fn the_sdxl_hash_covers_the_second_encoder_and_tokenizer() -> TestResult {
    let dir = write(TinyKind::Sdxl)?;
    let files = layout::ModelFiles::locate(dir.path())?.read_set();
    for rel in [
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
    ] {
        assert!(files.iter().any(|f| f == rel), "{rel} not in {files:?}");
    }
    let before = model_hash(dir.path())?;
    edit_json(&dir.path().join("tokenizer_2/tokenizer_config.json"), |v| {
        v["pad_token"] = serde_json::json!("<|endoftext|>");
    })?;
    let file = std::fs::File::options()
        .write(true)
        .open(dir.path().join("tokenizer_2/tokenizer_config.json"))?;
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))?;
    assert_ne!(model_hash(dir.path())?, before);
    Ok(())
}

/// Renders `r` with `pipeline`.
fn render(pipeline: &Pipeline, r: &Recipe) -> Result<RgbImage, PipelineError> {
    pipeline.txt2img(r, &mut |_, _| true)
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

/// Standard deviation of the bytes.
fn spread(image: &RgbImage) -> f64 {
    let n = image.pixels.len() as f64;
    let mean = image.pixels.iter().map(|&p| f64::from(p)).sum::<f64>() / n;
    let var = image
        .pixels
        .iter()
        .map(|&p| (f64::from(p) - mean).powi(2))
        .sum::<f64>()
        / n;
    var.sqrt()
}

/// Every kind renders through `Pipeline::load` + `txt2img`, the path real weights take.
/// The inpainting kind renders txt2img with a mask of ones and zero masked-image
/// latents, which proves its UNet takes the 9 channels.
#[test]
fn every_tiny_architecture_renders_deterministically() -> TestResult {
    for kind in TinyKind::ALL {
        let dir = write(kind)?;
        let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
        assert_eq!(pipeline.is_inpainting(), kind == TinyKind::Inpaint);
        let start = std::time::Instant::now();
        let base = render(&pipeline, &recipe("a red castle at sunset", 1))?;
        let elapsed = start.elapsed().as_secs_f64();
        assert_eq!((base.width, base.height), (64, 64));
        assert_eq!(base.pixels.len(), 64 * 64 * 3);
        let again = render(&pipeline, &recipe("a red castle at sunset", 1))?;
        assert!(base == again, "{kind}: same recipe, different pixels");
        let other = render(&pipeline, &recipe("a red castle at sunset", 2))?;
        let d_seed = distance(&base, &other);
        let std = spread(&base);
        println!("{kind}: {elapsed:.3} s per render, std {std:.1}, other seed {d_seed:.1}");
        assert!(d_seed > 5.0, "{kind}: a new seed barely changes the image");
        assert!(std > 5.0, "{kind}: nearly constant image (std {std})");
    }
    Ok(())
}

#[test]
fn sd21_pads_with_exclamation_marks_and_sdxl_per_tokenizer() -> TestResult {
    let bang = |ids: &[text::SpecialIds]| ids.iter().map(|i| i.pad == 0).collect::<Vec<_>>();
    let sd21 = Pipeline::load(write(TinyKind::Sd21)?.path(), &Device::Cpu)?;
    // "!" is the first byte token, id 0, as in CLIP's vocabulary.
    assert_eq!(bang(&sd21.text.special_ids()), [true]);
    let sdxl = Pipeline::load(write(TinyKind::Sdxl)?.path(), &Device::Cpu)?;
    assert_eq!(bang(&sdxl.text.special_ids()), [false, true]);
    let sd15 = Pipeline::load(write(TinyKind::Sd15)?.path(), &Device::Cpu)?;
    assert_eq!(bang(&sd15.text.special_ids()), [false]);
    Ok(())
}

#[test]
fn sdxl_text_conditioning() -> TestResult {
    let dir = write(TinyKind::Sdxl)?;
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
    let text = pipeline.text.encode("a cat", Some("a dog"))?;
    // 32 (first encoder) + 48 (second) per token; 40-wide pooled projection.
    assert_eq!(text.context.dims(), [2, 77, 80]);
    let pooled = text.pooled.ok_or("no pooled embedding")?;
    assert_eq!(pooled.dims(), [2, 40]);
    let norm = |t: &Tensor| -> candle_core::Result<f32> { t.abs()?.sum_all()?.to_scalar() };
    assert!(norm(&text.context.get(0)?)? > 0.0 && norm(&pooled.get(0)?)? > 0.0);

    // force_zeros_for_empty_prompt: an empty negative prompt is zero conditioning.
    let empty = pipeline.text.encode("a cat", Some(""))?;
    let pooled = empty.pooled.ok_or("no pooled embedding")?;
    assert_eq!(norm(&empty.context.get(0)?)?, 0.0);
    assert_eq!(norm(&pooled.get(0)?)?, 0.0);
    assert_eq!(
        empty.context.get(1)?.to_vec2::<f32>()?,
        text.context.get(1)?.to_vec2::<f32>()?
    );
    Ok(())
}

/// The added conditioning reaches the UNet: the pooled embedding and each time id
/// change its prediction (candle's UNet would ignore both).
#[test]
fn sdxl_added_conditioning_changes_the_prediction() -> TestResult {
    let dir = write(TinyKind::Sdxl)?;
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
    let cond = pipeline.conditioning("a cat", None, 8, 8)?;
    let added = cond.added.clone().ok_or("no added conditioning")?;
    assert_eq!(
        added.time_ids.to_vec2::<f32>()?,
        [[64., 64., 0., 0., 64., 64.]]
    );
    let latents = Tensor::from_vec(
        noise::standard_normal(3, noise::Purpose::InitialLatents, 0, 4 * 8 * 8),
        (1, 4, 8, 8),
        &Device::Cpu,
    )?;
    let predict = |c: &unet::Conditioning| -> candle_core::Result<Vec<f32>> {
        pipeline
            .unet
            .forward(&latents, 500.0, c)?
            .flatten_all()?
            .to_vec1()
    };
    let base = predict(&cond)?;
    let changed =
        |c: unet::Conditioning| -> Result<bool, candle_core::Error> { Ok(predict(&c)? != base) };
    for (i, value) in [(0usize, 32f32), (2, 16.0), (5, 128.0)] {
        let mut ids = [64f32, 64., 0., 0., 64., 64.];
        ids[i] = value;
        let mut c = cond.clone();
        c.added = Some(unet::AddedConditioning {
            time_ids: Tensor::from_vec(ids.to_vec(), (1, 6), &Device::Cpu)?,
            ..added.clone()
        });
        assert!(changed(c)?, "time id {i} has no effect");
    }
    let mut c = cond.clone();
    c.added = Some(unet::AddedConditioning {
        text_embeds: added.text_embeds.zeros_like()?,
        ..added.clone()
    });
    assert!(changed(c)?, "the pooled embedding has no effect");
    let mut c = cond.clone();
    c.added = None;
    assert!(
        predict(&c).is_err(),
        "the UNet ran without its added conditioning"
    );
    Ok(())
}

#[test]
fn inpainting_unet_needs_its_image_channels() -> TestResult {
    let dir = write(TinyKind::Inpaint)?;
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
    let cond = pipeline.conditioning("a cat", None, 8, 8)?;
    let image = cond.image.as_ref().ok_or("no image conditioning")?;
    assert_eq!(image.dims(), [1, 5, 8, 8]);
    let latents = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu)?;
    assert_eq!(
        pipeline.unet.forward(&latents, 10.0, &cond)?.dims(),
        [1, 4, 8, 8]
    );
    let mut without = cond.clone();
    without.image = None;
    let err = pipeline.unet.forward(&latents, 10.0, &without).err();
    assert!(
        err.as_ref()
            .is_some_and(|e| e.to_string().contains("9 input channels")),
        "{err:?}"
    );
    Ok(())
}

/// Edits a JSON file of a model folder in place.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> TestResult {
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value)?)?;
    Ok(())
}

/// Asserts that loading fails with a `Config` error on `file` whose message contains `key`.
fn assert_refused(dir: &Path, file: &str, key: &str) {
    let err = Pipeline::load(dir, &Device::Cpu).err();
    assert!(
        matches!(&err, Some(PipelineError::Config { path, message })
            if path == &dir.join(file) && message.contains(key)),
        "expected a Config error on {file} naming {key}, got {err:?}"
    );
}

#[test]
fn folders_kiln_cannot_run_are_refused_naming_file_and_key() -> TestResult {
    // An SDXL folder without its second encoder (the UNet still wants text_time).
    let dir = write(TinyKind::Sdxl)?;
    edit_json(&dir.path().join(layout::MODEL_INDEX), |v| {
        v["text_encoder_2"] = serde_json::json!([null, null]);
    })?;
    assert_refused(dir.path(), layout::UNET_CONFIG, "addition_embed_type");

    // The SDXL refiner's conditioning: 5 time ids, no first text encoder.
    let dir = write(TinyKind::Sdxl)?;
    edit_json(&dir.path().join(layout::UNET_CONFIG), |v| {
        v["projection_class_embeddings_input_dim"] = serde_json::json!(40 + 5 * 32);
    })?;
    assert_refused(
        dir.path(),
        layout::UNET_CONFIG,
        "projection_class_embeddings_input_dim",
    );
    let dir = write(TinyKind::Sdxl)?;
    edit_json(&dir.path().join(layout::MODEL_INDEX), |v| {
        v["requires_aesthetics_score"] = serde_json::json!(true);
    })?;
    assert_refused(dir.path(), layout::MODEL_INDEX, "requires_aesthetics_score");

    // A text encoder activation kiln does not implement.
    let dir = write(TinyKind::Sd21)?;
    edit_json(&dir.path().join(layout::TEXT_ENCODER_CONFIG), |v| {
        v["hidden_act"] = serde_json::json!("relu");
    })?;
    assert_refused(dir.path(), layout::TEXT_ENCODER_CONFIG, "hidden_act");

    // An InstructPix2Pix-style UNet (8 input channels).
    let dir = write(TinyKind::Inpaint)?;
    edit_json(&dir.path().join(layout::UNET_CONFIG), |v| {
        v["in_channels"] = serde_json::json!(8);
    })?;
    assert_refused(dir.path(), layout::UNET_CONFIG, "in_channels = 8");

    // Cross-attention that does not match the text encoders.
    let dir = write(TinyKind::Sd15)?;
    edit_json(&dir.path().join(layout::UNET_CONFIG), |v| {
        v["cross_attention_dim"] = serde_json::json!(64);
    })?;
    assert_refused(dir.path(), layout::UNET_CONFIG, "cross_attention_dim");
    Ok(())
}

/// f16 weight files (the `.fp16.safetensors` variants diffusers repos ship) load as f32
/// and render close to the f32 weights.
#[test]
fn f16_weights_load_as_f32() -> TestResult {
    let dir = write(TinyKind::Sd21)?;
    let reference = render(
        &Pipeline::load(dir.path(), &Device::Cpu)?,
        &recipe("a cat", 4),
    )?;
    for rel in [
        layout::UNET_WEIGHTS,
        layout::VAE_WEIGHTS,
        layout::TEXT_ENCODER_WEIGHTS,
    ] {
        let file = dir.path().join(rel);
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)?;
        let half = tensors
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(DType::F16)?)))
            .collect::<Result<std::collections::HashMap<_, _>, candle_core::Error>>()?;
        candle_core::safetensors::save(
            &half,
            dir.path()
                .join(rel.replace(".safetensors", ".fp16.safetensors")),
        )?;
        std::fs::remove_file(&file)?;
    }
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
    let image = render(&pipeline, &recipe("a cat", 4))?;
    let d = distance(&reference, &image);
    println!("f16 weights: mean |difference| per byte {d:.2}");
    assert!(d < 4.0, "f16 weights render far from f32: {d}");
    Ok(())
}

/// Writes every tiny kind and kiln's text and UNet outputs on fixed inputs to
/// `$KILN_PARITY_DIR`, for `scripts/diffusers_parity.py` to recompute
/// with diffusers and transformers. Run by hand:
/// `KILN_PARITY_DIR=/tmp/parity cargo test -p kiln-worker dump_for_diffusers -- --ignored`.
#[test]
#[ignore = "writes reference files for diffusers_parity.py; needs KILN_PARITY_DIR"]
fn dump_for_diffusers_parity() -> TestResult {
    use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;

    let root = std::path::PathBuf::from(std::env::var("KILN_PARITY_DIR")?);
    let (prompt, negative) = ("a red castle on a hill at sunset", "blurry, low quality");
    for kind in TinyKind::ALL {
        let dir = root.join(kind.name());
        std::fs::create_dir_all(&dir)?;
        write_tiny_model_kind(&dir, kind)?;
        let pipeline = Pipeline::load(&dir, &Device::Cpu)?;
        let mut out = std::collections::HashMap::new();
        let cond = pipeline.conditioning(prompt, Some(negative), 8, 8)?;
        let empty = pipeline.text.encode(prompt, Some(""))?;
        let latents = Tensor::from_vec(
            noise::standard_normal(7, noise::Purpose::InitialLatents, 0, 2 * 4 * 8 * 8),
            (2, 4, 8, 8),
            &Device::Cpu,
        )?;
        let timestep = 537.0;
        out.insert(
            "prediction".to_string(),
            pipeline.unet.forward(&latents, timestep, &cond)?,
        );
        if kind == TinyKind::Sd15 {
            // candle's own UNet on the same weights, to show where it departs from diffusers.
            let spec = config::read_unet(&dir.join(layout::UNET_CONFIG))?;
            let blocks = spec
                .blocks
                .iter()
                .map(
                    |b| candle_transformers::models::stable_diffusion::unet_2d::BlockConfig {
                        out_channels: b.channels,
                        use_cross_attn: b.attention.map(|a| a.layers),
                        attention_head_dim: b
                            .attention
                            .map_or(spec.mid_attention.heads, |a| a.heads),
                    },
                )
                .collect();
            let candle_config =
                candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModelConfig {
                    center_input_sample: false,
                    flip_sin_to_cos: spec.flip_sin_to_cos,
                    freq_shift: spec.freq_shift,
                    blocks,
                    layers_per_block: spec.layers_per_block,
                    downsample_padding: spec.downsample_padding,
                    mid_block_scale_factor: spec.mid_block_scale_factor,
                    norm_num_groups: spec.norm_num_groups,
                    norm_eps: spec.norm_eps,
                    cross_attention_dim: spec.cross_attention_dim,
                    sliced_attention_size: None,
                    use_linear_projection: spec.use_linear_projection,
                };
            let candle_unet = weights::build(
                &dir.join(layout::UNET_WEIGHTS),
                DType::F32,
                &Device::Cpu,
                |vb| UNet2DConditionModel::new(vb, 4, 4, false, candle_config),
            )?;
            out.insert(
                "candle_prediction".to_string(),
                candle_unet.forward(&latents, timestep, &cond.context)?,
            );
        }
        out.insert("latents".to_string(), latents);
        out.insert(
            "timestep".to_string(),
            Tensor::new(&[timestep as f32], &Device::Cpu)?,
        );
        out.insert("context".to_string(), cond.context);
        out.insert("context_empty_negative".to_string(), empty.context);
        if let Some(added) = cond.added {
            out.insert("text_embeds".to_string(), added.text_embeds);
            out.insert("time_ids".to_string(), added.time_ids);
        }
        if let Some(pooled) = empty.pooled {
            out.insert("text_embeds_empty_negative".to_string(), pooled);
        }
        if let Some(image) = cond.image {
            out.insert("image".to_string(), image);
        }
        candle_core::safetensors::save(&out, dir.join("kiln_outputs.safetensors"))?;
    }
    Ok(())
}
