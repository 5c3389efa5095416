//! Golden images: unweighted prompts render the bytes they rendered before prompt
//! weighting, the embedding cache and batching existed.
//!
//! The hashes were recorded on the commit before those changes (`d994c2f`), with
//! the CPU backend in [`RECORDED_BACKEND`]. Bytes are only promised equal within a
//! determinism class (CPU kernels differ by instruction set), so on another backend
//! the test prints what it rendered and checks that a second run renders the same;
//! on the recorded one it asserts every hash.

use candle_core::Device;
use kiln_proto::recipe::Scheduler;
use sha2::Digest;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The backend part of the determinism class the hashes were recorded on (f32).
const RECORDED_BACKEND: &str = "cpu-x86_64+avx512f+avx2+fma";

/// A prompt of more than one encoder window (96 tokens in the tiny vocabulary).
fn long_prompt() -> String {
    (0..96u8)
        .map(|i| char::from(b'a' + i % 26).to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The recipes whose images are pinned: (label, recipe).
fn cases() -> Vec<(String, Recipe)> {
    let base = Recipe {
        model: "tiny".into(),
        model_hash: String::new(),
        prompt: "a red castle on a hill at sunset".into(),
        negative_prompt: "blurry, low quality".into(),
        seed: 42,
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
    };
    vec![
        ("guided".into(), base.clone()),
        (
            "empty negative, euler_a".into(),
            Recipe {
                negative_prompt: String::new(),
                scheduler: Scheduler::EulerA,
                ..base.clone()
            },
        ),
        (
            "long prompt, dpmpp_2m karras".into(),
            Recipe {
                prompt: long_prompt(),
                scheduler: Scheduler::DpmPp2m,
                karras: true,
                ..base.clone()
            },
        ),
        (
            "unguided, 48x64".into(),
            Recipe {
                guidance: 1.0,
                width: 48,
                ..base
            },
        ),
    ]
}

/// Returns "kind / label: sha256 of the pixels" for every kind and case.
fn golden_lines() -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let mut lines = Vec::new();
    for kind in TinyKind::ALL {
        let dir = tempfile::tempdir()?;
        write_tiny_model_kind(dir.path(), kind)?;
        let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
        for (label, recipe) in cases() {
            let image = pipeline.txt2img(&recipe, &mut |_, _| true)?;
            let hash = hex::encode(sha2::Sha256::digest(&image.pixels));
            lines.push(format!("{kind} / {label}: {hash}"));
        }
    }
    Ok(lines)
}

#[test]
fn unweighted_prompts_render_the_recorded_bytes() -> TestResult {
    let lines = golden_lines()?;
    let class = crate::render::determinism_class(&Device::Cpu, Precision::F32);
    let recorded_here = class.split('/').nth(1) == Some(RECORDED_BACKEND);
    let mut different = Vec::new();
    for (line, want) in lines.iter().zip(RECORDED) {
        println!("{line}");
        if !line.ends_with(want) {
            different.push(line.as_str());
        }
    }
    if recorded_here {
        assert!(
            different.is_empty(),
            "these renders changed their bytes: {different:#?}"
        );
    } else {
        println!(
            "class {class}: the hashes were recorded on {RECORDED_BACKEND}; checking determinism only"
        );
        assert_eq!(golden_lines()?, lines, "a second run rendered other bytes");
    }
    Ok(())
}

/// sha256 of the pixels, in the order of `golden_lines`.
const RECORDED: [&str; 16] = [
    "dd94d5ffd33693c00562d9773c0ea24a85744eafe46ab583b68f8d8e164e5fbc",
    "9e248bfca8f8aa0248b83e01e5477c4dcf51cdecbc9d66ee840a3a97c74f644a",
    "3618a88188e204f544eea11c31778eb4aa16d941fb6c75388377ffc676c49a58",
    "9e4cc5790e2f7515a2cd6ad025b3b57c1ed9c3c7d5c3f040cd28ca0995051ebc",
    "0602d21e2c0dcf6df83aa8e8ac1f651ae4c6a0c094116a585834a7cc4dc27160",
    "e3f998830ed08309c144d91449e3dbdc2b3752a2a56c28b63d64f5209d22e559",
    "7d8df8017db2baac07008cf457e30cb191aa88248d73bdcd66d5db66ec104b5c",
    "95400eac00d8f8e3fce068483707770b8fca9913356486678bcaaeb617188ec4",
    "63a312152f9dc11d0f7defc3bddf369dde88b8b13cb05dce96b6243f89844808",
    "dbe72a20df8888f2067c3a8475374b0683b0402ac22da85e81c3941600d9a6b1",
    "01fbc6f44188ff3b371b3d4d4cc851e4f5c7459c9e0dca1eb20f81baaa5f45d6",
    "ef431d5890937b028369c677b0fa32b29a418ed4733cfb5777eba4d8f91fdb39",
    "519b687addab14d83e10d69d607cdda8de43ecd5696e60e4f4bcbc714c8c89e9",
    "da16c7c4b76e2ec258334b9782f1931963d0a567d7654cdb4a21d83879f807de",
    "f216eec07a9163ab1e9d01ac2785396e1e78fc8e1481bc663bbd2e5a15e83cfa",
    "1f28ed9707eef9e2a613bbed7dc2df3f8a0f36db20034ec496ed241f4e707782",
];
