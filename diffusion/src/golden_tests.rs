//! Golden images: the bytes pipeline version 3 renders for a few recipes on
//! every tiny architecture, so any change to a render's bytes is seen.
//!
//! Version 2's hashes were recorded before prompt weighting, the embedding cache
//! and batching existed (`d994c2f`), and held through them; version 3's differ
//! only by kiln's convolution (`conv`, which sums in another order), recorded with
//! the CPU backend in [`RECORDED_BACKEND`]. Bytes are only promised equal within a
//! determinism class (CPU kernels differ by instruction set), so on another backend
//! the test prints what it rendered and checks that a second run renders the same;
//! on the recorded one it asserts every hash.

use candle_core::Device;
use kiln_domain::recipe::Scheduler;
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
        extras: Default::default(),
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
    let class = crate::device::determinism_class(&Device::Cpu, Precision::F32);
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
    "8da4195aed65fb0b01820986c5e43c4becab2084a7d2f6df416e811008d7aee6",
    "9e248bfca8f8aa0248b83e01e5477c4dcf51cdecbc9d66ee840a3a97c74f644a",
    "7d870249d912d733d6916dd8927ceaa298f00f1a7737bd04ab7efe182bd48780",
    "9e4cc5790e2f7515a2cd6ad025b3b57c1ed9c3c7d5c3f040cd28ca0995051ebc",
    "f2d4775547d0427d79b7cb73fd4f73a8ee97df932df6d434e538c64aa9264685",
    "139e17e5bbb15a38512eabbd93a04b2b007aa774fd7b46cd5c91dae3b7866b39",
    "598e79c168e4c11df4926d6ace989b8927d8bbec01fbea2a730a8c4a21356226",
    "95400eac00d8f8e3fce068483707770b8fca9913356486678bcaaeb617188ec4",
    "5e46dcda802d44bf95eacadbaec12aa7b7e03163dd0a864eb0dc79932594bda1",
    "19beecdd3746379bd3af3e0a65a8bd2c9f863e1ed9af5e8745e82d4da67c2245",
    "6da63fa97729985b573d085bf6861355585871273602d5c8e467d7b170b29ec1",
    "ef431d5890937b028369c677b0fa32b29a418ed4733cfb5777eba4d8f91fdb39",
    "6ba6679464c9624efae3a01828b88898c889ac5602ef47e78da7e437727238ae",
    "f140b57ff8500e31021d6733252ed888634ec24fcc2b19a951f0e96f25658fbc",
    "f216eec07a9163ab1e9d01ac2785396e1e78fc8e1481bc663bbd2e5a15e83cfa",
    "46fd9a26cbe4f45ec00d78d1eba7024584a2af3075fc471fefb9b499385e2a57",
];
