//! Golden images: the bytes pipeline version 9 renders for a few recipes on
//! every tiny architecture, so any change to a render's bytes is seen.
//!
//! Version 2's hashes were recorded before prompt weighting, the embedding cache
//! and batching existed (`d994c2f`), and held through them; version 3's differ
//! only by kiln's convolution (`conv`, which sums in another order); version 4's by
//! kiln's attention blocks (`transformer`: the exact GELU, attention without a score
//! matrix) and fused group norm (`group_norm`); version 5's by `gemm`'s AVX-512
//! kernels (the workspace builds it with `x86-v4`); version 6's by the Winograd
//! form of 3×3 convolutions on large planes (`winograd`: two of the sixteen images
//! changed, both SDXL, the others round to the same pixels); version 7's by the
//! F(4×4, 3×3) form on planes of 64×64 and more (here the VAE decoder's last level:
//! two images changed, SD 1.5's long prompt and the inpainting model's Euler
//! ancestral), recorded with the CPU backend in [`RECORDED_BACKEND`]. Version 8
//! (attention units of 128 queries, the feed-forward in row chunks) was expected to
//! keep version 7's hashes and was not checked on that backend; it changed 9 of the
//! 16. Version 9's (`linear`: the tiny models' small products sum in another order;
//! Winograd forms on smaller planes, here the VAE decoder's 16×16 and 32×32 levels)
//! were recorded on that backend; 13 of the 16 differ from version 8's. Bytes are
//! only promised equal within a determinism class (CPU kernels differ by
//! instruction set), so on another backend the test prints what it rendered and
//! checks that a second run renders the same; on the recorded one it asserts every
//! hash.

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

#[test]
fn renders_the_same_bytes_on_any_thread_count() -> TestResult {
    // The CPU kernels split work by shape only: one thread and three render alike.
    let dir = tempfile::tempdir()?;
    write_tiny_model_kind(dir.path(), TinyKind::Sd15)?;
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu)?;
    let recipe = cases().swap_remove(0).1;
    let render = |threads: usize| -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let image = pool.install(|| pipeline.txt2img(&recipe, &mut |_, _| true))?;
        Ok(image.pixels)
    };
    let one = render(1)?;
    assert!(render(3)? == one, "3 threads rendered other bytes than 1");
    Ok(())
}

/// sha256 of the pixels, in the order of `golden_lines`.
const RECORDED: [&str; 16] = [
    "7fcbb8d7b8a380ea4fe4796d72f3a5108b4c5923e310049e48efdbe7b590160f",
    "bd183721eaef26e92a69abe5a9b78bbf8b5f2cfae65f1833c0f8414e40896677",
    "8205a30e15a5cf47c7c8c0248f270356c0c29203b0783f1ca7eaa1798c06e035",
    "1c87a25773d5238f4bd56350ec4e85d3556f3d5fbc1466cf51bf39d4b9d75138",
    "cff02e4c0a837e001c518ebdfe7b6883522612b8eb537af5153685ea1aa0614e",
    "19fcb56a1efd10bd7a64570473261c5daafc1813cde3a54194c20bf439571406",
    "0f838fe1c4e3680df2c81a100b504d3e88e97695c6fc96d45f844a5182887ac5",
    "343119e3cd6f18f08a4950af98c4cf935f20a6d350fcab3c1c213aa3492cae85",
    "e9c13ae99693bd4a26ef4e540021658a94fa954e1cc9fd617aec5084dae0d27d",
    "049e7c0c0934bf1411eafedc7455dc9816d6c6171585f2fb8c619dd74e78712e",
    "93bbedc4c6c7da6f8db036d18a09508d0eb2877655b688ffd1d7141127dd0e61",
    "f9b1716d32450ac1f220bcbf25aea79f9876c1d8bffc67c9ad988e0ed3d08f2c",
    "3dbdfb845e529ce6fe6526204fbcb634b3326d64cd68381836b1a89d9eef58c4",
    "4a83c23b100f821907cc4e4b539de5bbb826990fd0c3aa2ae02e3c83633c8067",
    "bf66661aa9146bb39a0061bef378e2f0a4cb18d8dc36d295018013d516174f22",
    "738e89058916b72576cce38c3a00e529ebf0e0385913cd7c53e65957e65e590f",
];
