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
