//! Golden images: the bytes pipeline version 4 renders for a few recipes on
//! every tiny architecture, so any change to a render's bytes is seen.
//!
//! Version 2's hashes were recorded before prompt weighting, the embedding cache
//! and batching existed (`d994c2f`), and held through them; version 3's differ
//! only by kiln's convolution (`conv`, which sums in another order); version 4's by
//! kiln's attention blocks (`transformer`: the exact GELU, attention without a score
//! matrix) and fused group norm (`group_norm`), recorded with the CPU backend in
//! [`RECORDED_BACKEND`]. Bytes are only promised equal within a
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
    "e47ab4663d7359bdd61678a795b8dcfdc7ce1b4a83b2bafb6aa2ee7b9af19e1e",
    "bd183721eaef26e92a69abe5a9b78bbf8b5f2cfae65f1833c0f8414e40896677",
    "600ac736afb9d3292a52d1924822a79dc42cd78bf8e8822bb9b0c1eae57c6b51",
    "1311653e4f82fe00303638252e35f87ddc929a192eb66b03f3bc46a373e514f0",
    "7dba89d50fd91c37012da0a45e50affc8f0bf6c8953b863fa142e4dcd2ed79de",
    "687cda9f91025df9369f6f7d8fdea175e550f8348fe9bb0d39010161bbb8f6ce",
    "18f20dd3b24f0166e57321fb3a9f08ccae4cd1378fe426c7600b80b126c13dee",
    "343119e3cd6f18f08a4950af98c4cf935f20a6d350fcab3c1c213aa3492cae85",
    "d3d9a036ba6a522ba9c2dd6c4f1dc37208c3ae70162f2ffcb1c28de1f1ea898f",
    "acd33ec4706062b32daf760f9ead4a622e983ad6633172e5eea6459d9c4efe2a",
    "304247c315f7e83551b004ce4e8baf2a44035979d86bf7d08d5ce75fda33416b",
    "89d298429ed87a583ebe7f186e5fdd57b7dc168cee8ecfc568414c2269ae80a8",
    "3dbdfb845e529ce6fe6526204fbcb634b3326d64cd68381836b1a89d9eef58c4",
    "1e7637a77b4845eddfc44c38bba451a9e7084312c40ea693213ddb5bc85737d4",
    "6b2b14f80ceb2f5952216e1b62f4acac26ab94ef1773b16f9047cafb8075f6cf",
    "738e89058916b72576cce38c3a00e529ebf0e0385913cd7c53e65957e65e590f",
];
