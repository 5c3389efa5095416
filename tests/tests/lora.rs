//! The LoRA and embedding tools of issue #13, run as a user runs them:
//! `kiln lora tiny` and `kiln embedding tiny`.

use std::path::Path;

use kiln_tests::*;

/// Returns the tensor names and shapes of a safetensors file, read from its header.
fn header(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    v.remove("__metadata__");
    v
}

fn shape(h: &serde_json::Map<String, serde_json::Value>, key: &str) -> Vec<u64> {
    h[key]["shape"]
        .as_array()
        .unwrap_or_else(|| panic!("no {key}"))
        .iter()
        .map(|d| d.as_u64().unwrap())
        .collect()
}

#[test]
fn lora_tiny_writes_kohya_and_peft_files_that_fit_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model();
    let file = |n: &str| dir.path().join(n);
    let run = |out: &Path, format: &str, seed: &str| {
        kiln(&[
            "lora",
            "tiny",
            "--model",
            arg(&model),
            "--out",
            arg(out),
            "--format",
            format,
            "--seed",
            seed,
        ])
    };
    let kohya = run(&file("ink.safetensors"), "kohya", "1");
    assert_eq!(kohya.code, 0, "{}", kohya.stderr);
    assert!(kohya.stdout.contains("kohya LoRA of"), "{}", kohya.stdout);
    let h = header(&file("ink.safetensors"));
    let conv = "lora_unet_down_blocks_0_resnets_0_conv1";
    // LoCon: a 3×3 down convolution and a 1×1 up for a ResNet's 3×3 convolution.
    assert_eq!(
        shape(&h, &format!("{conv}.lora_down.weight")),
        [4, 32, 3, 3]
    );
    assert_eq!(shape(&h, &format!("{conv}.lora_up.weight")), [32, 4, 1, 1]);
    assert_eq!(shape(&h, &format!("{conv}.alpha")), Vec::<u64>::new());
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";
    assert_eq!(shape(&h, &format!("{q}.lora_down.weight")), [4, 32]);
    assert!(
        h.keys()
            .any(|k| k.starts_with("lora_te_text_model_encoder_layers_0_self_attn_q_proj"))
    );

    let peft = run(&file("mira.safetensors"), "peft", "2");
    assert_eq!(peft.code, 0, "{}", peft.stderr);
    let h = header(&file("mira.safetensors"));
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q";
    assert_eq!(shape(&h, &format!("{q}.lora_A.weight")), [4, 32]);
    assert_eq!(shape(&h, &format!("{q}.lora_B.weight")), [32, 4]);
    assert!(
        h.contains_key("text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight")
    );
    assert!(
        h.keys()
            .all(|k| !k.ends_with(".alpha") && !k.contains("conv1"))
    );

    // The same seed writes the same bytes; another seed, others.
    assert_eq!(run(&file("again.safetensors"), "kohya", "1").code, 0);
    assert_eq!(run(&file("other.safetensors"), "kohya", "3").code, 0);
    let bytes = |n: &str| std::fs::read(file(n)).unwrap();
    assert!(bytes("again.safetensors") == bytes("ink.safetensors"));
    assert!(bytes("other.safetensors") != bytes("ink.safetensors"));

    let bad = run(&file("x.safetensors"), "lycoris", "1");
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("lycoris"), "{}", bad.stderr);
    let missing = kiln(&[
        "lora",
        "tiny",
        "--model",
        arg(&dir.path().join("nowhere")),
        "--out",
        arg(&file("y.safetensors")),
    ]);
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("nowhere"), "{}", missing.stderr);
}

#[test]
fn embedding_tiny_writes_two_vectors_per_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("badhands.safetensors");
    let r = kiln(&[
        "embedding",
        "tiny",
        "--model",
        arg(&tiny_model()),
        "--out",
        arg(&out),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("hash"), "{}", r.stdout);
    let h = header(&out);
    assert_eq!(h.len(), 1);
    assert_eq!(shape(&h, "emb_params"), [2, 32]);

    let xl = dir.path().join("xl");
    let made = kiln(&["model", "tiny", "--kind", "sdxl", "--out", arg(&xl)]);
    assert_eq!(made.code, 0, "{}", made.stderr);
    let out = dir.path().join("xl.safetensors");
    let r = kiln(&["embedding", "tiny", "--model", arg(&xl), "--out", arg(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let h = header(&out);
    assert_eq!(shape(&h, "clip_l")[0], 2);
    assert_eq!(shape(&h, "clip_g")[0], 2);
    assert!(shape(&h, "clip_g")[1] > shape(&h, "clip_l")[1]);
}

/// A farm's inputs: the tiny model, `inkwash` (kohya) in `loras/`, `badhands` in
/// `embeddings/`, and the `--model` argument.
struct Inputs {
    dir: tempfile::TempDir,
    model: String,
}

impl Inputs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tiny = tiny_model();
        let lora = dir.path().join("loras").join("inkwash.safetensors");
        let r = kiln(&[
            "lora",
            "tiny",
            "--model",
            arg(&tiny),
            "--out",
            arg(&lora),
            "--seed",
            "1",
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let emb = dir.path().join("embeddings").join("badhands.safetensors");
        let r = kiln(&[
            "embedding",
            "tiny",
            "--model",
            arg(&tiny),
            "--out",
            arg(&emb),
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        Self {
            dir,
            model: format!("tiny={}", tiny.display()),
        }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `kiln render` of `batch` (the file's text) with `flags`; returns the
    /// output folder's PNGs in item order.
    fn render(&self, name: &str, batch: &str, flags: &[&str]) -> Vec<std::path::PathBuf> {
        let file = self.path(&format!("{name}.toml"));
        std::fs::write(&file, batch).unwrap();
        let out = self.path(name);
        let mut args = vec![
            "render",
            arg(&file),
            "--model",
            &self.model,
            "--out",
            arg(&out),
        ];
        args.extend_from_slice(flags);
        let r = kiln(&args);
        assert_eq!(r.code, 0, "kiln render {name}: {}", r.stderr);
        pngs(&out)
    }
}

const PLAIN: &str = "[defaults]\nmodel = \"tiny\"\nwidth = 64\nheight = 64\nsteps = 3\nnegative_prompt = \"blurry\"\n";

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// The pixels of a PNG (its metadata chunks carry the recipe, which differs).
fn pixels(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

#[test]
fn a_plain_render_after_a_lora_render_is_a_fresh_farms_plain_render() {
    let a = Inputs::new();
    let loras = a.path("loras");
    let mixed = a.render(
        "mixed",
        &format!(
            "{PLAIN}[[items]]\nprompt = \"a lighthouse\"\nseed = 9\nloras = [{{ name = \"inkwash\", weight = 1.0 }}]\n[[items]]\nprompt = \"a lighthouse\"\nseed = 10\n[[items]]\nprompt = \"<lora:inkwash:0.8> a lighthouse\"\nseed = 11\n"
        ),
        &["--lora-dir", arg(&loras), "--workers", "1"],
    );
    assert_eq!(mixed.len(), 3);
    let fresh = a.render(
        "fresh",
        &format!("{PLAIN}[[items]]\nprompt = \"a lighthouse\"\nseed = 9\n[[items]]\nprompt = \"a lighthouse\"\nseed = 10\n"),
        &[],
    );
    // The LoRA changes its item; the plain item after it is the fresh farm's, byte for byte.
    assert!(
        pixels(&mixed[0]) != pixels(&fresh[0]),
        "a LoRA at weight 1 changed nothing"
    );
    assert!(
        bytes(&mixed[1]) == bytes(&fresh[1]),
        "drift after a LoRA render"
    );
    // A <lora:...> tag in the prompt applies the LoRA too.
    let tagged = a.render(
        "tagged",
        &format!("{PLAIN}[[items]]\nprompt = \"a lighthouse\"\nseed = 11\n"),
        &[],
    );
    assert!(pixels(&mixed[2]) != pixels(&tagged[0]));
    let lines = manifest(&a.path("mixed")).unwrap();
    let recipe = &lines[0]["recipe"];
    assert_eq!(recipe["loras"][0]["name"], "inkwash", "{recipe}");
    assert_eq!(
        recipe["loras"][0]["hash"].as_str().map(str::len),
        Some(64),
        "the recipe records the LoRA's hash: {recipe}"
    );
}

#[test]
fn a_series_takes_its_character_from_a_lora() {
    let a = Inputs::new();
    let loras = a.path("loras");
    let series = |loras: &str| {
        format!(
            "[series.mira]\nmodel = \"tiny\"\ncharacter = \"Mira, a cartographer\"\nseed = 777\nwidth = 64\nheight = 64\nsteps = 3\nanchor = true\nconsistency = 0.6\n{loras}\n[[series.mira.shots]]\nprompt = \"on a cliff\"\n[[series.mira.shots]]\nprompt = \"in a market\"\n"
        )
    };
    let flags = ["--lora-dir", arg(&loras)];
    let with = a.render(
        "with",
        &series("loras = [{ name = \"inkwash\", weight = 0.8 }]"),
        &flags,
    );
    let again = a.render(
        "again",
        &series("loras = [{ name = \"inkwash\", weight = 0.8 }]"),
        &flags,
    );
    let without = a.render("without", &series(""), &flags);
    assert_eq!(with.len(), 3, "anchor and two shots: {with:?}");
    for ((w, g), o) in with.iter().zip(&again).zip(&without) {
        assert!(
            bytes(w) == bytes(g),
            "{} renders the same bytes again",
            w.display()
        );
        assert!(pixels(w) != pixels(o), "{} shows the LoRA", w.display());
    }
    for line in manifest(&a.path("with")).unwrap() {
        assert_eq!(line["recipe"]["loras"][0]["name"], "inkwash", "{line}");
    }
}

#[test]
fn an_embedding_in_the_negative_prompt_changes_the_render() {
    let a = Inputs::new();
    let embeddings = a.path("embeddings");
    let item = |negative: &str| {
        format!(
            "{PLAIN}[[items]]\nprompt = \"a lighthouse\"\nnegative_prompt = \"{negative}\"\nseed = 9\n"
        )
    };
    let text = a.render("text", &item("badhands"), &[]);
    let vectors = a.render(
        "vectors",
        &item("badhands"),
        &["--embedding-dir", arg(&embeddings)],
    );
    assert!(
        pixels(&text[0]) != pixels(&vectors[0]),
        "the embedding changed nothing"
    );
    let lines = manifest(&a.path("vectors")).unwrap();
    assert_eq!(
        lines[0]["recipe"]["embeddings"][0]["name"], "badhands",
        "{}",
        lines[0]
    );
    // A prompt that names no embedding renders as on a farm without embeddings.
    let plain = a.render(
        "plain",
        &item("blurry"),
        &["--embedding-dir", arg(&embeddings)],
    );
    let fresh = a.render("fresh", &item("blurry"), &[]);
    assert!(bytes(&plain[0]) == bytes(&fresh[0]));
}
