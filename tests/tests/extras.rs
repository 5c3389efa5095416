//! LoRAs and ControlNets between real processes (issues 13 and 14): sim
//! workers announce what `--lora-dir` and `--controlnet` give them, the
//! coordinator pins each name to its hash at submission and routes every task
//! only to workers that hold all it names; an unknown LoRA is refused at
//! submission, naming the batch file's line and field. A candle worker keeps
//! its model, merged LoRA variants and ControlNets under one `--memory-budget`,
//! and its resident-bytes gauge counts them all.

use std::path::Path;

use kiln_tests::{
    Coordinator, arg, free_port, http_get, kiln, manifest, metric_sum, sha256_file, sim_worker,
    submit_text, tiny_model, wait_for_workers, watch_ok, worker,
};

/// Writes a LoRA-like file: sim workers only hash it.
fn asset(dir: &Path, name: &str, bytes: &[u8]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, bytes).unwrap();
    sha256_file(&path).unwrap()
}

/// Starts a sim worker of `simtoy` that takes 40 ms a step, so a fast one
/// beside it gets the tasks both may take.
fn slow_sim_worker(d: &Path, url: &str, id: &str, extra: &[&str]) -> kiln_tests::Proc {
    let mut args = vec![
        "--renderer",
        "sim",
        "--model",
        "simtoy",
        "--sim-step",
        "40ms",
    ];
    args.extend_from_slice(extra);
    worker(d, url, id, &args).unwrap()
}

/// Fetches a job into `dir/NAME` and returns its manifest lines.
fn fetch(url: &str, job: &str, out: &Path) -> Vec<serde_json::Value> {
    let f = kiln(&["fetch", job, "--out", arg(out), "--coordinator", url]);
    assert_eq!(f.code, 0, "fetch: {}", f.stderr);
    manifest(out).unwrap()
}

/// The LoRAs a manifest line's recipe names, as (name, hash).
fn loras(line: &serde_json::Value) -> Vec<(String, String)> {
    line["recipe"]["loras"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|x| {
                    (
                        x["name"].as_str().unwrap_or_default().to_string(),
                        x["hash"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn tasks_with_a_lora_only_one_worker_holds_go_to_that_worker() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ink = asset(&d.join("all"), "inkwash", b"inkwash weights");
    let mira = asset(&d.join("all"), "mira", b"mira weights");
    asset(&d.join("some"), "inkwash", b"inkwash weights");
    let coord = Coordinator::start(d, &[]).unwrap();
    // w-all is slow, w-some fast: w-some takes every task it may.
    let _all = slow_sim_worker(d, &coord.url, "w-all", &["--lora-dir", arg(&d.join("all"))]);
    let _some = sim_worker(
        d,
        &coord.url,
        "w-some",
        &["--lora-dir", arg(&d.join("some"))],
        &[],
    )
    .unwrap();
    wait_for_workers(&coord.url, 2);
    let job = submit_text(
        d,
        &coord.url,
        "b.toml",
        r#"[defaults]
model = "simtoy"
width = 64
height = 64
steps = 3
[sweep]
seed = [1, 2, 3, 4]
prompt = ["<lora:mira:0.8> a cartographer on a cliff", "an ink drawing of a harbour"]
loras = [[], [{ name = "inkwash", weight = 0.7 }]]
"#,
    );
    watch_ok(&coord.url, &job);
    let lines = fetch(&coord.url, &job, &d.join("out"));
    assert_eq!(lines.len(), 16);
    let mut on_some = 0;
    for l in &lines {
        let named = loras(l);
        let worker = l["worker"].as_str().unwrap();
        if named.iter().any(|(n, _)| n == "mira") {
            assert_eq!(worker, "w-all", "a mira task ran on {worker}: {l}");
        } else {
            on_some += usize::from(worker == "w-some");
        }
        // Each name is pinned to its file's hash; the tag keeps its weight.
        for (name, hash) in &named {
            let want = if name == "mira" { &mira } else { &ink };
            assert_eq!(hash, want, "{name} in {l}");
        }
        let prompt = l["recipe"]["prompt"].as_str().unwrap();
        assert_eq!(
            prompt.contains("<lora:mira"),
            named.iter().any(|(n, _)| n == "mira"),
            "tags become LoRAs: {l}"
        );
    }
    assert!(on_some > 0, "the fast worker took none of the plain tasks");
    let with = lines
        .iter()
        .find(|l| loras(l).len() == 2)
        .expect("a task with both LoRAs");
    let png = std::fs::read(d.join("out").join(with["file"].as_str().unwrap())).unwrap();
    let text = String::from_utf8_lossy(&png);
    let want = format!(
        "Lora hashes: \"inkwash: {}, mira: {}\"",
        &ink[..12],
        &mira[..12]
    );
    let want_tag_first = format!(
        "Lora hashes: \"mira: {}, inkwash: {}\"",
        &mira[..12],
        &ink[..12]
    );
    assert!(
        text.contains(&want) || text.contains(&want_tag_first),
        "no Lora hashes line in the PNG parameters"
    );
}

#[test]
fn a_task_needing_a_controlnet_goes_to_the_worker_that_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cn = d.join("pose.safetensors");
    std::fs::write(&cn, b"pose controlnet").unwrap();
    let cn_hash = sha256_file(&cn).unwrap();
    image::RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]))
        .save(d.join("run.png"))
        .unwrap();
    let coord = Coordinator::start(d, &[]).unwrap();
    let control = format!("pose={}", arg(&cn));
    let _cn = slow_sim_worker(d, &coord.url, "w-cn", &["--controlnet", &control]);
    let _plain = sim_worker(d, &coord.url, "w-plain", &[], &[]).unwrap();
    wait_for_workers(&coord.url, 2);
    let mut text = String::from(
        "[defaults]\nmodel = \"simtoy\"\nwidth = 64\nheight = 64\nsteps = 3\n\
         hires = { scale = 1.5, steps = 2 }\n",
    );
    for i in 0..6 {
        text.push_str(&format!("[[items]]\nprompt = \"knight {i}\"\n"));
        if i % 2 == 0 {
            text.push_str(
                "controlnets = [{ model = \"pose\", image = \"run.png\", scale = 0.8, preprocess = \"canny\" }]\n",
            );
        }
    }
    let job = submit_text(d, &coord.url, "cn.toml", &text);
    watch_ok(&coord.url, &job);
    let lines = fetch(&coord.url, &job, &d.join("out"));
    assert_eq!(lines.len(), 6);
    let mut on_plain = 0;
    for l in &lines {
        let cns = l["recipe"]["controlnets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let worker = l["worker"].as_str().unwrap();
        if cns.is_empty() {
            on_plain += usize::from(worker == "w-plain");
        } else {
            assert_eq!(worker, "w-cn", "a ControlNet task ran on {worker}: {l}");
            assert_eq!(cns[0]["hash"], cn_hash.as_str());
            let png = std::fs::read(d.join("out").join(l["file"].as_str().unwrap())).unwrap();
            let text = String::from_utf8_lossy(&png);
            let want = format!(
                "ControlNet 0: \"Module: canny, Model: pose [{}], Weight: 0.8, Guidance Start: 0.0, Guidance End: 1.0\"",
                &cn_hash[..8]
            );
            assert!(text.contains(&want), "no ControlNet line in the PNG");
        }
        // The hires fix: the image is 1.5 x 64 = 96 pixels a side.
        let img = image::open(d.join("out").join(l["file"].as_str().unwrap())).unwrap();
        assert_eq!((img.width(), img.height()), (96, 96));
    }
    assert!(on_plain > 0, "the fast worker took none of the plain tasks");
}

#[test]
fn an_unknown_lora_is_refused_at_submission_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    asset(&d.join("loras"), "inkwash", b"inkwash weights");
    let coord = Coordinator::start(d, &["--model-grace", "0s"]).unwrap();
    let _w = sim_worker(
        d,
        &coord.url,
        "w1",
        &["--lora-dir", arg(&d.join("loras"))],
        &[],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let file = d.join("bad.toml");
    std::fs::write(
        &file,
        "[defaults]\nmodel = \"simtoy\"\nwidth = 64\nheight = 64\nsteps = 3\n[[items]]\nprompt = \"a harbour\"\nloras = [{ name = \"inkwash\" }, { name = \"nope\", weight = 0.5 }]\n",
    )
    .unwrap();
    let out = kiln(&["submit", arg(&file), "--coordinator", &coord.url]);
    assert_ne!(out.code, 0, "an unknown LoRA was accepted: {}", out.stdout);
    assert!(
        out.stderr.contains(
            ":8: items[0].loras[1].name: unknown LoRA \"nope\"; workers have announced inkwash"
        ),
        "{}",
        out.stderr
    );
    // A tag names the prompt.
    std::fs::write(
        &file,
        "[defaults]\nmodel = \"simtoy\"\nwidth = 64\nheight = 64\nsteps = 3\n[[items]]\nprompt = \"<lora:ghost:1> a harbour\"\n",
    )
    .unwrap();
    let out = kiln(&["submit", arg(&file), "--coordinator", &coord.url]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains(":7: items[0].prompt: unknown LoRA \"ghost\""),
        "{}",
        out.stderr
    );
}

/// The bytes a loaded safetensors file holds by the worker's measure: every
/// element of every tensor in its header, times 4.
fn loaded_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let elements: u64 = header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    elements * 4
}

#[test]
fn a_candle_worker_keeps_lora_variants_and_controlnets_under_its_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_model();
    for (name, seed) in [("a", "1"), ("b", "2")] {
        let out = d.join("loras").join(format!("{name}.safetensors"));
        let r = kiln(&[
            "lora",
            "tiny",
            "--model",
            arg(&model),
            "--out",
            arg(&out),
            "--seed",
            seed,
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let cn = d.join("cn");
    let r = kiln(&[
        "model",
        "tiny",
        "--kind",
        "controlnet",
        "--base",
        "sd15",
        "--out",
        arg(&cn),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    image::RgbImage::from_fn(64, 64, |x, _| image::Rgb([(x * 4) as u8; 3]))
        .save(d.join("pose.png"))
        .unwrap();
    let weights = |component: &str| {
        model.join(component).join(match component {
            "text_encoder" => "model.safetensors",
            _ => "diffusion_pytorch_model.safetensors",
        })
    };
    let model_bytes: u64 = ["unet", "text_encoder", "vae"]
        .iter()
        .map(|c| loaded_bytes(&weights(c)))
        .sum();
    // One LoRA set merges a UNet and a text encoder.
    let set = loaded_bytes(&weights("unet")) + loaded_bytes(&weights("text_encoder"));
    let net = loaded_bytes(&cn.join("diffusion_pytorch_model.safetensors"));
    // Room for the model and one set, not two.
    let budget = model_bytes + set;

    let coord = Coordinator::start(d, &[]).unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let _w = worker(
        d,
        &coord.url,
        "w1",
        &[
            "--model",
            &format!("tiny={}", model.display()),
            "--lora-dir",
            arg(&d.join("loras")),
            "--controlnet",
            &format!("pose={}", cn.display()),
            "--memory-budget",
            &budget.to_string(),
            "--http",
            &http,
        ],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let resident = |extra: &str, seed: u32| -> u64 {
        let text = format!(
            "[defaults]\nmodel = \"tiny\"\nwidth = 64\nheight = 64\nsteps = 2\n[[items]]\nprompt = \"a harbour\"\nseed = {seed}\n{extra}\n"
        );
        let job = submit_text(d, &coord.url, &format!("job{seed}.toml"), &text);
        watch_ok(&coord.url, &job);
        let metrics = http_get(&http, "/metrics", None).unwrap().body;
        metric_sum(&metrics, "kiln_models_resident_bytes").expect("the gauge") as u64
    };
    assert_eq!(resident("", 1), model_bytes, "the model alone");
    assert_eq!(resident("loras = [{ name = \"a\" }]", 2), model_bytes + set);
    // Without the budget b's variants would join a's.
    assert_eq!(resident("loras = [{ name = \"b\" }]", 3), model_bytes + set);
    assert_eq!(resident("loras = [{ name = \"a\" }]", 4), model_bytes + set);
    let with_net = resident(
        "controlnets = [{ model = \"pose\", image = \"pose.png\" }]",
        5,
    );
    assert!(
        with_net <= budget && with_net >= model_bytes + net,
        "{with_net} bytes resident with a ControlNet of {net}, budget {budget}"
    );
}
