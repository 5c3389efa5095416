//! LoRAs and textual-inversion embeddings through the whole pipeline, on tiny models.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use kiln_domain::extras::{EmbeddingRef, LoraRef};

use super::tests::{TestResult, distance, recipe, render, tiny};
use super::*;

/// A tiny model of `kind` with `inkwash` (kohya), `mira` (PEFT) and the embedding
/// `badhands` among its assets.
struct Fixture {
    _dir: tempfile::TempDir,
    pipeline: Pipeline,
}

fn fixture(kind: TinyKind) -> Result<Fixture, Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_tiny_model_kind(&model, kind)?;
    let loras = dir.path().join("loras");
    let embeddings = dir.path().join("embeddings");
    write_tiny_lora(
        &model,
        &loras.join("inkwash.safetensors"),
        LoraFormat::Kohya,
        1,
    )?;
    write_tiny_lora(&model, &loras.join("mira.safetensors"), LoraFormat::Peft, 2)?;
    write_tiny_embedding(&model, &embeddings.join("badhands.safetensors"), 3)?;
    let mut pipeline = Pipeline::load(&model, &Device::Cpu)?;
    pipeline.set_assets(Arc::new(Assets::scan(&[loras], &[embeddings], &[])?));
    Ok(Fixture {
        _dir: dir,
        pipeline,
    })
}

fn lora(name: &str, unet_weight: f64, te_weight: f64) -> LoraRef {
    LoraRef {
        name: name.into(),
        hash: String::new(),
        unet_weight,
        te_weight,
    }
}

fn with_loras(prompt: &str, seed: u64, loras: Vec<LoraRef>) -> Recipe {
    let mut r = recipe(prompt, seed);
    r.extras.loras = loras;
    r
}

#[test]
fn kohya_and_peft_loras_change_the_image_and_leave_no_trace() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let base = render(p, &recipe("a lighthouse", 9))?;
    // The fixture's model is the tiny model, so a fresh pipeline renders the same bytes.
    assert!(base == render(tiny(), &recipe("a lighthouse", 9))?);
    let kohya = render(
        p,
        &with_loras("a lighthouse", 9, vec![lora("inkwash", 0.7, 0.7)]),
    )?;
    let peft = render(
        p,
        &with_loras("a lighthouse", 9, vec![lora("mira", 0.7, 0.7)]),
    )?;
    assert!(
        distance(&base, &kohya) > 5.0,
        "kohya: {}",
        distance(&base, &kohya)
    );
    assert!(
        distance(&base, &peft) > 5.0,
        "peft: {}",
        distance(&base, &peft)
    );
    assert!(distance(&kohya, &peft) > 5.0);
    // The text encoders' deltas alone change the image too (the chunk cache keeps
    // the merged encoder's chunks apart from the base encoder's).
    let text_only = render(
        p,
        &with_loras("a lighthouse", 9, vec![lora("inkwash", 0.0, 1.0)]),
    )?;
    assert!(
        distance(&base, &text_only) > 1.0,
        "{}",
        distance(&base, &text_only)
    );
    // Weight 0, and the render after LoRA renders: the base bytes.
    let zero = render(
        p,
        &with_loras("a lighthouse", 9, vec![lora("inkwash", 0.0, 0.0)]),
    )?;
    assert!(zero == base);
    assert!(render(p, &recipe("a lighthouse", 9))? == base);
    // The same LoRA again: the same bytes, from the kept variants (UNet and encoder).
    let again = render(
        p,
        &with_loras("a lighthouse", 9, vec![lora("inkwash", 0.7, 0.7)]),
    )?;
    assert!(again == kohya);
    // Two LoRAs add up: different from each alone.
    let both = render(
        p,
        &with_loras(
            "a lighthouse",
            9,
            vec![lora("inkwash", 0.7, 0.7), lora("mira", 0.7, 0.7)],
        ),
    )?;
    assert!(both != kohya && both != peft);
    Ok(())
}

#[test]
fn merged_variants_stay_within_the_budget() -> TestResult {
    let mut f = fixture(TinyKind::Sd15)?;
    let one = with_loras("a lighthouse", 9, vec![lora("inkwash", 0.7, 0.7)]);
    let other = with_loras("a lighthouse", 9, vec![lora("mira", 0.7, 0.7)]);
    let first = render(&f.pipeline, &one)?;
    // A UNet and a text encoder merged with the set.
    assert_eq!(f.pipeline.lora_variants().0, 2);
    render(&f.pipeline, &other)?;
    assert_eq!(
        f.pipeline.lora_variants().0,
        4,
        "room for two sets by default"
    );
    let (_, bytes) = f.pipeline.lora_variants();
    // Room for one set: the second evicts the first.
    f.pipeline.set_lora_budget(bytes / 2);
    render(&f.pipeline, &one)?;
    render(&f.pipeline, &other)?;
    assert_eq!(f.pipeline.lora_variants(), (2, bytes / 2));
    f.pipeline.set_lora_budget(0);
    assert!(
        render(&f.pipeline, &one)? == first,
        "merged again, same bytes"
    );
    assert_eq!(f.pipeline.lora_variants(), (0, 0));
    Ok(())
}

#[test]
fn a_pipeline_reports_the_lora_sets_it_holds_ready() -> TestResult {
    let mut f = fixture(TinyKind::Sd15)?;
    // Recipes as the coordinator sends them: each LoRA pinned to its file's hash.
    let pinned = |p: &Pipeline, name: &str, unet: f64, te: f64| {
        let mut l = lora(name, unet, te);
        l.hash = p.assets().loras[name].hash.clone();
        l
    };
    let one = with_loras(
        "a lighthouse",
        9,
        vec![pinned(&f.pipeline, "inkwash", 0.7, 0.7)],
    );
    let other = with_loras(
        "a lighthouse",
        9,
        vec![pinned(&f.pipeline, "mira", 0.5, 0.0)],
    );
    let key = |r: &Recipe| kiln_domain::lora_set::LoraSet::of(&r.extras.loras).key();
    assert!(
        f.pipeline.ready_lora_sets().is_empty(),
        "nothing merged yet"
    );
    render(&f.pipeline, &recipe("a lighthouse", 9))?;
    assert!(
        f.pipeline.ready_lora_sets().is_empty(),
        "the base model is no set"
    );
    render(&f.pipeline, &one)?;
    assert_eq!(f.pipeline.ready_lora_sets(), [key(&one)]);
    render(&f.pipeline, &other)?;
    assert_eq!(
        f.pipeline.ready_lora_sets(),
        [key(&other), key(&one)],
        "both kept, the latest first"
    );
    // Room for one UNet and one text encoder: rendering `one` evicts `other`'s UNet.
    let (_, bytes) = f.pipeline.lora_variants();
    f.pipeline.set_lora_budget(bytes * 2 / 3);
    assert!(
        f.pipeline.ready_lora_sets().is_empty(),
        "the variants were dropped"
    );
    render(&f.pipeline, &other)?;
    render(&f.pipeline, &one)?;
    assert_eq!(f.pipeline.ready_lora_sets(), [key(&one)]);
    f.pipeline.set_lora_budget(0);
    render(&f.pipeline, &one)?;
    assert!(
        f.pipeline.ready_lora_sets().is_empty(),
        "a set merged for one render and dropped is not ready"
    );
    // The owner budgets the variants as parts: a dropped part unreadies its set.
    f.pipeline.set_lora_budget(u64::MAX);
    render(&f.pipeline, &one)?;
    assert_eq!(f.pipeline.ready_lora_sets(), [key(&one)]);
    let unet = f
        .pipeline
        .parts()
        .into_iter()
        .map(|(part, _)| part)
        .find(|part| {
            matches!(
                part,
                Part::LoraVariant {
                    component: "unet",
                    ..
                }
            )
        })
        .expect("the merged UNet is a part");
    assert!(f.pipeline.drop_part(&unet));
    assert!(f.pipeline.ready_lora_sets().is_empty());
    Ok(())
}

#[test]
fn merged_variants_are_parts_with_bytes_that_an_owner_can_drop() -> TestResult {
    let mut f = fixture(TinyKind::Sd15)?;
    // The owner keeps the budget: the pipeline evicts nothing itself.
    f.pipeline.set_lora_budget(u64::MAX);
    let p = &f.pipeline;
    let one = with_loras("a lighthouse", 9, vec![lora("inkwash", 0.7, 0.7)]);
    let unet_only = with_loras("a lighthouse", 9, vec![lora("mira", 0.5, 0.0)]);
    let inputs = [RenderInput::txt2img(&one), RenderInput::txt2img(&unet_only)];
    let needed = p.parts_needed(&inputs);
    let labels: Vec<&str> = needed.iter().map(|n| n.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "unet merged with LoRA \"inkwash\" 0.7",
            "text_encoder merged with LoRA \"inkwash\" 0.7",
            "unet merged with LoRA \"mira\" 0.5",
        ]
    );
    // Each the size of its component, by the catalog's measure.
    let model = f._dir.path().join("model");
    let unet = crate::inspect::file_bytes(&model.join("unet/diffusion_pytorch_model.safetensors"))?;
    assert_eq!(needed[0].bytes, unet);
    assert_eq!(needed[2].bytes, unet);
    assert!(needed[1].bytes > 0 && needed[1].bytes != unet);
    assert!(p.parts().is_empty());
    assert!(
        p.parts_needed(&[RenderInput::txt2img(&recipe("a lighthouse", 9))])
            .is_empty()
    );

    let first = render(p, &one)?;
    render(p, &unet_only)?;
    let mut held = p.parts();
    held.sort();
    let mut expected: Vec<_> = needed.iter().map(|n| (n.part.clone(), n.bytes)).collect();
    expected.sort();
    assert_eq!(held, expected, "the renders hold what was announced");
    // Listed as held: the same parts and bytes again.
    assert_eq!(p.parts_needed(&inputs), needed);

    for n in &needed[..2] {
        assert!(p.drop_part(&n.part), "{}", n.part);
    }
    assert_eq!(p.parts(), [(needed[2].part.clone(), needed[2].bytes)]);
    assert!(render(p, &one)? == first, "merged again, the same bytes");
    assert_eq!(p.parts().len(), 3);
    Ok(())
}

#[test]
fn batched_renders_equal_single_ones_with_mixed_lora_sets() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let recipes = [
        recipe("a harbour", 1),
        with_loras("a harbour", 2, vec![lora("inkwash", 0.7, 0.7)]),
        with_loras("a harbour", 3, vec![lora("mira", 0.8, 0.0)]),
        with_loras("a harbour", 4, vec![lora("inkwash", 0.7, 0.7)]),
        recipe("a harbour", 5),
    ];
    let inputs: Vec<RenderInput<'_>> = recipes.iter().map(RenderInput::txt2img).collect();
    let batched = p.render_batch(&inputs, &mut |_, _, _| true);
    for (r, got) in recipes.iter().zip(batched) {
        assert!(got?.image == render(p, r)?, "seed {}", r.seed);
    }
    Ok(())
}

#[test]
fn names_the_pipeline_lacks_are_invalid_recipes() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let missing = with_loras("a harbour", 1, vec![lora("nowhere", 1.0, 1.0)]);
    let err = render(&f.pipeline, &missing).unwrap_err();
    assert!(
        matches!(&err, PipelineError::InvalidRecipe { field: "loras", message } if message.contains("nowhere")),
        "{err}"
    );
    let mut wrong_hash = with_loras("a harbour", 1, vec![lora("inkwash", 1.0, 1.0)]);
    wrong_hash.extras.loras[0].hash = "0".repeat(64);
    let err = render(&f.pipeline, &wrong_hash).unwrap_err();
    assert!(
        matches!(err, PipelineError::InvalidRecipe { field: "loras", .. }),
        "{err}"
    );
    let mut no_embedding = recipe("a harbour", 1);
    no_embedding.extras.embeddings = vec![EmbeddingRef {
        name: "goodhands".into(),
        hash: String::new(),
    }];
    let err = render(&f.pipeline, &no_embedding).unwrap_err();
    assert!(
        matches!(&err, PipelineError::InvalidRecipe { field: "embeddings", message } if message.contains("goodhands")),
        "{err}"
    );
    Ok(())
}

/// Writes `tensors` as a LoRA file named `name` and returns the assets holding it alone.
fn lora_file(
    dir: &Path,
    name: &str,
    tensors: HashMap<String, Tensor>,
) -> Result<Arc<Assets>, Box<dyn std::error::Error + Send + Sync>> {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder)?;
    candle_core::safetensors::save(&tensors, folder.join(format!("{name}.safetensors")))?;
    Ok(Arc::new(Assets::scan(&[folder], &[], &[])?))
}

#[test]
fn a_lora_that_does_not_fit_is_refused_naming_the_first_key_at_fault() -> TestResult {
    let mut f = fixture(TinyKind::Sd15)?;
    let dir = tempfile::tempdir()?;
    let cpu = &Device::Cpu;
    let good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let mut tensors = HashMap::new();
    tensors.insert(
        format!("{good}.lora_down.weight"),
        Tensor::ones((4, 32), DType::F32, cpu)?,
    );
    tensors.insert(
        format!("{good}.lora_up.weight"),
        Tensor::ones((32, 4), DType::F32, cpu)?,
    );
    // An SDXL-only module: unknown to SD 1.5's UNet.
    let unknown =
        "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight";
    tensors.insert(unknown.into(), Tensor::ones((4, 32), DType::F32, cpu)?);
    f.pipeline
        .set_assets(lora_file(dir.path(), "unknown", tensors.clone())?);
    let err = render(
        &f.pipeline,
        &with_loras("a", 1, vec![lora("unknown", 1.0, 1.0)]),
    )
    .unwrap_err();
    assert!(
        matches!(&err, PipelineError::Weights { message, .. } if message.contains(unknown)),
        "{err}"
    );
    // A wrong shape: an up matrix for 64 outputs on a 32-wide projection.
    tensors.remove(unknown);
    tensors.insert(
        format!("{good}.lora_up.weight"),
        Tensor::ones((64, 4), DType::F32, cpu)?,
    );
    f.pipeline
        .set_assets(lora_file(dir.path(), "misshapen", tensors)?);
    let err = render(
        &f.pipeline,
        &with_loras("a", 1, vec![lora("misshapen", 1.0, 1.0)]),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&format!("{good}.lora_up.weight")) && message.contains("[64, 4]"),
        "{message}"
    );
    // A LoRA for SDXL on SD 1.5: refused, naming a key.
    let sdxl = tempfile::tempdir()?;
    write_tiny_model_kind(sdxl.path(), TinyKind::Sdxl)?;
    let folder = dir.path().join("xl");
    write_tiny_lora(
        sdxl.path(),
        &folder.join("xl.safetensors"),
        LoraFormat::Peft,
        1,
    )?;
    f.pipeline
        .set_assets(Arc::new(Assets::scan(&[folder], &[], &[])?));
    let err = render(&f.pipeline, &with_loras("a", 1, vec![lora("xl", 1.0, 1.0)])).unwrap_err();
    assert!(
        matches!(&err, PipelineError::Weights { message, .. } if message.contains("tensor ")),
        "{err}"
    );
    Ok(())
}

#[test]
fn an_embedding_in_the_negative_prompt_changes_the_image() -> TestResult {
    let f = fixture(TinyKind::Sd15)?;
    let p = &f.pipeline;
    let mut plain = recipe("a lighthouse", 9);
    plain.negative_prompt = "badhands".into();
    let mut embedded = plain.clone();
    embedded.extras.embeddings = vec![EmbeddingRef {
        name: "badhands".into(),
        hash: String::new(),
    }];
    let text = render(p, &plain)?;
    let vectors = render(p, &embedded)?;
    assert!(
        distance(&text, &vectors) > 1.0,
        "{}",
        distance(&text, &vectors)
    );
    // Weighted as any word is.
    let mut weighted = embedded.clone();
    weighted.negative_prompt = "(badhands:1.4), blurry".into();
    let mut unweighted = embedded.clone();
    unweighted.negative_prompt = "badhands, blurry".into();
    assert!(render(p, &weighted)? != render(p, &unweighted)?);
    // The same embedding in the prompt, and the plain text again: its own bytes.
    assert!(render(p, &plain)? == text);
    let mut in_prompt = embedded.clone();
    in_prompt.prompt = "a badhands lighthouse".into();
    assert!(render(p, &in_prompt)? != vectors);
    Ok(())
}

#[test]
fn sdxl_takes_kohya_te1_te2_loras_and_two_encoder_embeddings() -> TestResult {
    let f = fixture(TinyKind::Sdxl)?;
    let p = &f.pipeline;
    let lora_path = &p.assets().loras["inkwash"].path;
    let keys = weights::shapes(lora_path)?;
    assert!(keys.keys().any(|k| k.starts_with("lora_te1_")));
    assert!(keys.keys().any(|k| k.starts_with("lora_te2_")));
    let base = render(p, &recipe("a lighthouse", 9))?;
    let with = render(
        p,
        &with_loras("a lighthouse", 9, vec![lora("inkwash", 0.7, 0.7)]),
    )?;
    assert!(distance(&base, &with) > 5.0, "{}", distance(&base, &with));
    let text_only = render(
        p,
        &with_loras("a lighthouse", 9, vec![lora("mira", 0.0, 1.0)]),
    )?;
    assert!(text_only != base);
    let mut embedded = recipe("a lighthouse", 9);
    embedded.negative_prompt = "badhands".into();
    embedded.extras.embeddings = vec![EmbeddingRef {
        name: "badhands".into(),
        hash: String::new(),
    }];
    let mut plain = embedded.clone();
    plain.extras.embeddings.clear();
    assert!(render(p, &embedded)? != render(p, &plain)?);
    assert!(render(p, &recipe("a lighthouse", 9))? == base);
    Ok(())
}

/// Returns the conditioning of a guided 64 px render of `prompt` with `extras`.
fn conditioning(
    p: &Pipeline,
    prompt: &str,
    negative: &str,
    extras: &text_extras::TextExtras,
) -> Result<unet::Conditioning, PipelineError> {
    let s = p.scheduled_conditioning(prompt, Some(negative), 1, (8, 8), None, extras)?;
    s.select(&s.rows_at(0))
}

/// Writes tiny models with a kohya and a PEFT LoRA and an embedding, and kiln's
/// outputs with each, to `$KILN_PARITY_DIR/lora/<kind>`, for
/// `scripts/lora_parity.py` to recompute with diffusers and PEFT. Run by hand:
/// `KILN_PARITY_DIR=/tmp/parity cargo test -p kiln-diffusion dump_for_lora_parity -- --ignored`.
#[test]
#[ignore = "writes reference files for lora_parity.py; needs KILN_PARITY_DIR"]
fn dump_for_lora_parity() -> TestResult {
    let root = std::path::PathBuf::from(std::env::var("KILN_PARITY_DIR")?).join("lora");
    let (prompt, negative) = ("a red castle on a hill at sunset", "blurry, low quality");
    let embedded_prompt = "a badhands castle on a hill";
    for kind in [TinyKind::Sd15, TinyKind::Sd21, TinyKind::Sdxl] {
        let dir = root.join(kind.name());
        let model = dir.join("model");
        write_tiny_model_kind(&model, kind)?;
        write_tiny_lora(
            &model,
            &dir.join("inkwash.safetensors"),
            LoraFormat::Kohya,
            1,
        )?;
        write_tiny_lora(&model, &dir.join("mira.safetensors"), LoraFormat::Peft, 2)?;
        write_tiny_embedding(&model, &dir.join("emb").join("badhands.safetensors"), 3)?;
        let mut p = Pipeline::load(&model, &Device::Cpu)?;
        p.set_assets(Arc::new(Assets::scan(
            std::slice::from_ref(&dir),
            &[dir.join("emb")],
            &[],
        )?));
        let mut out = HashMap::new();
        let latents = Tensor::from_vec(
            noise::standard_normal(7, noise::Purpose::InitialLatents, 0, 2 * 4 * 8 * 8),
            (2, 4, 8, 8),
            &Device::Cpu,
        )?;
        let timestep = 537.0;
        let base = p.conditioning(prompt, Some(negative), 8, 8)?;
        for name in ["inkwash", "mira"] {
            let r = with_loras(prompt, 1, vec![lora(name, 0.7, 0.7)]);
            let applied = adapters::apply(&p, &r)?;
            out.insert(
                format!("unet_{name}"),
                applied.unet.forward(&latents, timestep, &base)?,
            );
            let cond = conditioning(&p, prompt, negative, &applied.text)?;
            out.insert(format!("context_{name}"), cond.context);
            if let Some(added) = cond.added {
                out.insert(format!("text_embeds_{name}"), added.text_embeds);
            }
        }
        let mut r = recipe(embedded_prompt, 1);
        r.extras.embeddings = vec![EmbeddingRef {
            name: "badhands".into(),
            hash: String::new(),
        }];
        let applied = adapters::apply(&p, &r)?;
        let cond = conditioning(&p, embedded_prompt, negative, &applied.text)?;
        out.insert("context_badhands".into(), cond.context);
        if let Some(added) = base.added {
            out.insert("text_embeds".into(), added.text_embeds);
            out.insert("time_ids".into(), added.time_ids);
        }
        out.insert("context".into(), base.context);
        out.insert("latents".into(), latents);
        out.insert(
            "timestep".into(),
            Tensor::new(&[timestep as f32], &Device::Cpu)?,
        );
        candle_core::safetensors::save(&out, dir.join("kiln_outputs.safetensors"))?;
    }
    Ok(())
}

/// Times merging on an SD-1.5-shaped model against the UNet step it saves, and one
/// attention projection with and without an on-the-fly low-rank branch. Run by
/// hand (writes ~4.5 GB):
/// `KILN_LORA_BENCH_DIR=/tmp/lora-bench cargo test --release -p kiln-diffusion measure_lora_merge -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement on an SD-1.5-shaped model; needs KILN_LORA_BENCH_DIR"]
fn measure_lora_merge() -> TestResult {
    use std::time::Instant;

    use candle_core::Module;

    let root = std::path::PathBuf::from(std::env::var("KILN_LORA_BENCH_DIR")?);
    let model = root.join("sd15");
    if !model.join("model_index.json").is_file() {
        bench::write_sd15_shaped_model(&model)?;
    }
    let loras = root.join("loras");
    let modules = write_tiny_lora(&model, &loras.join("big.safetensors"), LoraFormat::Kohya, 1)?;
    let started = Instant::now();
    let mut p = Pipeline::load(&model, &Device::Cpu)?;
    eprintln!("base load: {:.2} s", started.elapsed().as_secs_f64());
    p.set_assets(Arc::new(Assets::scan(&[loras], &[], &[])?));
    for (what, l) in [
        ("UNet", lora("big", 0.7, 0.0)),
        ("text encoder", lora("big", 0.0, 0.7)),
    ] {
        let started = Instant::now();
        adapters::apply(&p, &with_loras("a", 1, vec![l.clone()]))?;
        eprintln!(
            "merge {modules} modules into the {what}: {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        adapters::apply(&p, &with_loras("a", 1, vec![l]))?;
        eprintln!(
            "kept {what} variant: {:.4} s",
            started.elapsed().as_secs_f64()
        );
    }
    // One guided UNet step at 256 px, base and merged.
    let latents = Tensor::zeros((2, 4, 32, 32), DType::F32, &Device::Cpu)?;
    let cond = p.conditioning("a", Some(""), 32, 32)?;
    let merged = adapters::apply(&p, &with_loras("a", 1, vec![lora("big", 0.7, 0.0)]))?.unet;
    for (what, unet) in [("base", &p.unet), ("merged", &merged)] {
        let started = Instant::now();
        unet.forward(&latents, 500.0, &cond)?;
        eprintln!(
            "guided UNet step, 256 px, {what}: {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
    // A level-0 attention projection at 256 px (2 × 1024 tokens, 320 wide), with a
    // rank-r branch added on the fly as PEFT does: x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
    let cpu = &Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 1024, 320), cpu)?;
    let linear = candle_nn::Linear::new(Tensor::randn(0f32, 0.05, (320, 320), cpu)?, None);
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
        f()?;
        let started = Instant::now();
        for _ in 0..20 {
            f()?;
        }
        Ok(started.elapsed().as_secs_f64() / 20.0)
    };
    let base = time(&|| linear.forward(&x))?;
    eprintln!("to_q 320x320 on 2x1024 tokens: {:.3} ms", base * 1e3);
    for rank in [4usize, 16, 64] {
        let a = candle_nn::Linear::new(Tensor::randn(0f32, 0.05, (rank, 320), cpu)?, None);
        let b = candle_nn::Linear::new(Tensor::randn(0f32, 0.05, (320, rank), cpu)?, None);
        let with = time(&|| linear.forward(&x)? + (b.forward(&a.forward(&x)?)? * 0.7)?)?;
        eprintln!(
            "  with a rank-{rank} branch on the fly: {:.3} ms (+{:.0}%)",
            with * 1e3,
            (with / base - 1.0) * 100.0
        );
    }
    Ok(())
}
