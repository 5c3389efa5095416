//! LoRA-set affinity between real processes (issue 13): workers report the
//! LoRA sets they hold merged with every lease, and the coordinator sends
//! each worker first the tasks of a job whose set it holds ready. The sim
//! workers hold sets ready from `--sim-ready-lora` and after rendering with
//! them; the candle worker after merging them for a render.

use std::path::Path;

use kiln_proto::pb;
use kiln_tests::*;

/// Writes a LoRA-like file: sim workers only hash it.
fn asset(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{name}.safetensors")), name).unwrap();
}

/// The task indices of a job's leases, in the order they were leased, with
/// the worker each went to.
fn leases(url: &str, job: &str) -> Vec<(u32, String)> {
    events(url, job)
        .into_iter()
        .filter(|e| e.kind == pb::EventKind::Leased as i32)
        .map(|e| (e.index, e.worker_id))
        .collect()
}

/// Items alternating between the LoRAs `a` and `b` at weight 0.8, as prompt tags.
fn alternating(model: &str, n: u32, a: &str, b: &str) -> String {
    let mut text = format!("[defaults]\nmodel = \"{model}\"\nwidth = 64\nheight = 64\nsteps = 2\n");
    for i in 0..n {
        let lora = if i % 2 == 0 { a } else { b };
        text.push_str(&format!(
            "[[items]]\nprompt = \"<lora:{lora}:0.8> a harbour\"\nseed = {i}\n"
        ));
    }
    text
}

#[test]
fn each_task_goes_to_the_sim_worker_holding_its_lora_set_ready() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let loras = d.join("loras");
    asset(&loras, "ink");
    asset(&loras, "mira");
    let coord = Coordinator::start(d, &[]).unwrap();
    // Both hold both LoRAs; each has one set merged. Four slots each and no
    // prefetch place: a claim takes the first task and fills the slots with
    // its batch. (A fifth place would take the first task of the other set,
    // the same model's next task in item order.)
    let start = |id: &str, ready: &str| {
        sim_worker(
            d,
            &coord.url,
            id,
            &[
                "--lora-dir",
                arg(&loras),
                "--sim-ready-lora",
                ready,
                "--slots",
                "4",
                "--prefetch",
                "0",
            ],
            &[],
        )
        .unwrap()
    };
    let _ink = start("w-ink", "<lora:ink:0.8>");
    let _mira = start("w-mira", "<lora:mira:0.8>");
    wait_for_workers(&coord.url, 2);
    let job = submit_text(
        d,
        &coord.url,
        "b.toml",
        &alternating("simtoy", 8, "ink", "mira"),
    );
    watch_ok(&coord.url, &job);
    let got = leases(&coord.url, &job);
    assert_eq!(got.len(), 8, "one lease per task: {got:?}");
    // Whichever worker asked first, item 0 (ink) heads the queue: w-mira
    // takes item 1 and the mira items after it, w-ink the ink items.
    for (index, worker) in &got {
        let want = if index % 2 == 0 { "w-ink" } else { "w-mira" };
        assert_eq!(worker, want, "item {index}: {got:?}");
    }
}

#[test]
fn a_sim_worker_takes_the_tasks_of_its_ready_set_before_the_heads_of_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let loras = d.join("loras");
    asset(&loras, "ink");
    asset(&loras, "mira");
    let coord = Coordinator::start(d, &[]).unwrap();
    let _w = sim_worker(
        d,
        &coord.url,
        "w-mira",
        &[
            "--lora-dir",
            arg(&loras),
            "--sim-ready-lora",
            "<lora:mira:0.8>",
        ],
        &[],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let job = submit_text(
        d,
        &coord.url,
        "b.toml",
        &alternating("simtoy", 6, "ink", "mira"),
    );
    watch_ok(&coord.url, &job);
    let order: Vec<u32> = leases(&coord.url, &job).iter().map(|l| l.0).collect();
    // One slot: the mira items first, then ink from item order (merged once,
    // then ready too).
    assert_eq!(order, [1, 3, 5, 0, 2, 4]);
}

#[test]
fn a_candle_worker_reports_the_lora_set_it_rendered_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = tiny_model();
    let loras = d.join("loras");
    for (name, seed) in [("ink", "1"), ("mira", "2")] {
        let out = loras.join(format!("{name}.safetensors"));
        let r = kiln(&[
            "lora",
            "tiny",
            "--model",
            arg(&tiny),
            "--out",
            arg(&out),
            "--seed",
            seed,
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let coord = Coordinator::start(d, &[]).unwrap();
    let model = format!("tiny={}", tiny.display());
    let _w = worker(
        d,
        &coord.url,
        "w-candle",
        &["--model", &model, "--lora-dir", arg(&loras)],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    // A render with ink merges it; the worker holds it ready from then on.
    let first = submit_text(
        d,
        &coord.url,
        "first.toml",
        &alternating("tiny", 1, "ink", "ink"),
    );
    watch_ok(&coord.url, &first);
    // mira heads the queue, but the worker holds ink ready: the ink items go
    // first, then mira is merged once for both of its items.
    let job = submit_text(
        d,
        &coord.url,
        "b.toml",
        &alternating("tiny", 4, "mira", "ink"),
    );
    watch_ok(&coord.url, &job);
    let order: Vec<u32> = leases(&coord.url, &job).iter().map(|l| l.0).collect();
    assert_eq!(order, [1, 3, 0, 2]);
}
