//! Issue #2, the spine: real processes, real gRPC on loopback, the tiny model.

use std::collections::HashSet;
use std::time::Duration;

use kiln_proto::pb::{self, TaskState};
use kiln_tests::*;

/// The batch file of issue #2, word for word: 2 prompts x 4 seeds plus one item.
const ISSUE_BATCH: &str = r#"[defaults]
model = "tiny"
width = 64
height = 64
steps = 4
guidance = 5.0
scheduler = "ddim"
negative_prompt = "blurry, low quality"

[sweep]
prompt = ["a red fox sitting on a mossy stone, watercolor", "a vintage camera with brass lenses, steampunk"]
seed = [1, 2, 3, 4]

[[items]]
prompt = "a lighthouse at dusk"
seed = 42
"#;

#[test]
fn embedded_render_writes_nine_distinct_images_byte_identical_on_a_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_model();
    let batch = dir.path().join("shots.toml");
    std::fs::write(&batch, ISSUE_BATCH).unwrap();
    let model = format!("tiny={}", tiny.display());
    let (out1, out2) = (dir.path().join("out1"), dir.path().join("out2"));
    for out in [&out1, &out2] {
        let r = kiln(&["render", arg(&batch), "--model", &model, "--out", arg(out)]);
        assert_eq!(r.code, 0, "kiln render failed: {}", r.stderr);
    }
    let files = pngs(&out1);
    assert_eq!(files.len(), 9, "{files:?}");
    let mut distinct = HashSet::new();
    for f in &files {
        let png = decode_png(f).unwrap();
        assert_eq!((png.width, png.height), (64, 64), "{}", f.display());
        distinct.insert(png.pixels);
    }
    assert_eq!(distinct.len(), 9, "the 9 images must all differ");
    let lines = manifest(&out1).unwrap();
    assert_eq!(lines.len(), 9);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        let file = line["file"].as_str().unwrap();
        assert_eq!(
            sha256_file(&out1.join(file)).unwrap(),
            line["sha256"].as_str().unwrap()
        );
    }
    assert_eq!(lines[8]["seed"], 42);
    assert_eq!(lines[8]["recipe"]["prompt"], "a lighthouse at dusk");
    for f in &files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(f).unwrap(),
            std::fs::read(out2.join(name)).unwrap(),
            "{name:?} differs between two runs"
        );
    }
}

/// A worker with four slots leases the nine items four at a time and denoises each
/// lease as one UNet batch: the PNGs are those `kiln render` makes one by one.
#[test]
fn a_worker_rendering_batches_writes_the_bytes_of_one_by_one_renders() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = tiny_model();
    let model = format!("tiny={}", tiny.display());
    let batch = d.join("shots.toml");
    std::fs::write(&batch, ISSUE_BATCH).unwrap();
    let one_by_one = d.join("one-by-one");
    let r = kiln(&[
        "render",
        arg(&batch),
        "--model",
        &model,
        "--out",
        arg(&one_by_one),
    ]);
    assert_eq!(r.code, 0, "kiln render failed: {}", r.stderr);

    let coord = Coordinator::start(d, &[]).unwrap();
    let _w = worker(d, &coord.url, "w4", &["--model", &model, "--slots", "4"]).unwrap();
    wait_for_workers(&coord.url, 1);
    // The job's tasks are queued at once, so the waiting lease takes four of them.
    let sub = kiln(&["submit", arg(&batch), "--json", "--coordinator", &coord.url]);
    assert_eq!(sub.code, 0, "{}", sub.stderr);
    let job = job_id(&sub.stdout).unwrap();
    let watch = kiln(&["watch", &job, "--coordinator", &coord.url]);
    assert_eq!(watch.code, 0, "watch: {}\n{}", watch.stdout, watch.stderr);
    let batched = d.join("batched");
    let fetch = kiln(&[
        "fetch",
        &job,
        "--out",
        arg(&batched),
        "--coordinator",
        &coord.url,
    ]);
    assert_eq!(fetch.code, 0, "{}", fetch.stderr);

    let (alone, together) = (manifest(&one_by_one).unwrap(), manifest(&batched).unwrap());
    assert_eq!((alone.len(), together.len()), (9, 9));
    for (a, b) in alone.iter().zip(&together) {
        assert_eq!(a["index"], b["index"]);
        assert_eq!(
            a["sha256"], b["sha256"],
            "item {} differs when batched",
            a["index"]
        );
    }
}

#[test]
fn sigkilled_worker_loses_no_item() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = tiny_model();
    let model = format!("tiny={}", tiny.display());
    let coord =
        Coordinator::start(d, &["--lease-ttl", "3s", "--heartbeat-interval", "500ms"]).unwrap();
    let mut w1 = worker(d, &coord.url, "w1", &["--model", &model]).unwrap();
    let _w2 = worker(d, &coord.url, "w2", &["--model", &model]).unwrap();
    wait_for_workers(&coord.url, 2);
    let batch = d.join("b20.toml");
    sweep_file(&batch, "tiny", 5, 4, 30).unwrap();
    let sub = kiln(&["submit", arg(&batch), "--json", "--coordinator", &coord.url]);
    assert_eq!(sub.code, 0, "{}", sub.stderr);
    let job = job_id(&sub.stdout).unwrap();

    // Kill w1 while it holds a lease.
    wait_for(Duration::from_secs(60), "w1 to hold a lease", || {
        let j = get_job(&coord.url, &job);
        j.tasks
            .iter()
            .any(|t| {
                t.state == TaskState::Leased as i32
                    && t.attempts.last().is_some_and(|a| a.worker_id == "w1")
            })
            .then_some(())
    });
    w1.kill();

    let watch = kiln(&["watch", &job, "--coordinator", &coord.url]);
    assert_eq!(watch.code, 0, "watch: {}\n{}", watch.stdout, watch.stderr);
    let out = d.join("fetched");
    let fetch = kiln(&[
        "fetch",
        &job,
        "--out",
        arg(&out),
        "--coordinator",
        &coord.url,
    ]);
    assert_eq!(fetch.code, 0, "{}", fetch.stderr);

    let files = pngs(&out);
    assert_eq!(files.len(), 20);
    for f in &files {
        let png = decode_png(f).unwrap();
        assert_eq!((png.width, png.height), (64, 64));
    }
    let lines = manifest(&out).unwrap();
    assert_eq!(lines.len(), 20);
    let indices: HashSet<u64> = lines.iter().map(|l| l["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, (0..20).collect(), "every item exactly once");
    assert!(lines.iter().all(|l| l["status"] == "completed"));

    let tasks = get_job(&coord.url, &job).tasks;
    let orphaned: Vec<_> = tasks
        .iter()
        .filter(|t| {
            t.attempts
                .iter()
                .any(|a| a.worker_id == "w1" && a.outcome == "expired")
        })
        .collect();
    assert!(!orphaned.is_empty(), "the killed worker held a lease");
    for t in orphaned {
        assert_eq!(
            t.attempts.len(),
            2,
            "task {} attempts: {:?}",
            t.index,
            t.attempts
        );
        assert_eq!(t.attempts[1].worker_id, "w2");
        assert_eq!(t.attempts[1].outcome, "completed");
        let line = &lines[t.index as usize];
        assert_eq!(line["attempts"], 2);
    }
    // The coordinator's own result folder holds the 20 images and nothing staged.
    let job_dir = coord.results.join(&job);
    assert_eq!(pngs(&job_dir).len(), 20);
    let staged = std::fs::read_dir(job_dir.join(".staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0);
}

#[test]
fn stalled_worker_is_fenced_and_its_image_never_appears() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord =
        Coordinator::start(d, &["--lease-ttl", "2s", "--heartbeat-interval", "300ms"]).unwrap();
    let stalled = worker(
        d,
        &coord.url,
        "stalled",
        &[
            "--model",
            "tiny",
            "--renderer",
            "sim",
            "--sim-step",
            "300ms",
        ],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let batch = d.join("one.toml");
    sweep_file(&batch, "tiny", 1, 1, 10).unwrap();
    let sub = kiln(&["submit", arg(&batch), "--json", "--coordinator", &coord.url]);
    let job = job_id(&sub.stdout).unwrap();
    wait_for(Duration::from_secs(30), "the lease", || {
        (get_job(&coord.url, &job).tasks[0].state == TaskState::Leased as i32).then_some(())
    });
    stalled.signal("STOP");
    wait_for(Duration::from_secs(30), "the lease to be reaped", || {
        let t = &get_job(&coord.url, &job).tasks[0];
        (t.attempts.first().is_some_and(|a| a.outcome == "expired")).then_some(())
    });
    let _fresh = worker(
        d,
        &coord.url,
        "fresh",
        &["--model", "tiny", "--renderer", "sim", "--sim-step", "0ms"],
    )
    .unwrap();
    let watch = kiln(&["watch", &job, "--coordinator", &coord.url]);
    assert_eq!(watch.code, 0, "{}", watch.stderr);
    stalled.signal("CONT");
    // Resumed, the stalled worker either has its Complete refused or is told to abandon.
    wait_for(
        Duration::from_secs(30),
        "the stalled worker to give up its result",
        || {
            let log = stalled.output();
            (log.contains("report refused: lease lost")
                || log.contains("task abandoned as the coordinator asked"))
            .then_some(())
        },
    );
    let t = &get_job(&coord.url, &job).tasks[0];
    assert_eq!(t.attempts.len(), 2);
    assert_eq!(
        (
            t.attempts[0].worker_id.as_str(),
            t.attempts[0].outcome.as_str()
        ),
        ("stalled", "expired")
    );
    assert_eq!(
        (
            t.attempts[1].worker_id.as_str(),
            t.attempts[1].outcome.as_str()
        ),
        ("fresh", "completed")
    );
    let evs = events(&coord.url, &job);
    assert!(
        !evs.iter()
            .any(|e| e.kind == pb::EventKind::Completed as i32 && e.worker_id == "stalled"),
        "no completion by the stalled worker may be accepted"
    );
    if stalled.output().contains("report refused: lease lost") {
        assert!(
            evs.iter()
                .any(|e| e.kind == pb::EventKind::StaleRefused as i32 && e.worker_id == "stalled")
        );
    }
    let out = d.join("out");
    assert_eq!(
        kiln(&[
            "fetch",
            &job,
            "--out",
            arg(&out),
            "--coordinator",
            &coord.url
        ])
        .code,
        0
    );
    let lines = manifest(&out).unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["worker"], "fresh");
    assert_eq!(lines[0]["epoch"], t.attempts[1].epoch);
    assert!(t.attempts[1].epoch > t.attempts[0].epoch);
    assert_eq!(pngs(&coord.results.join(&job)).len(), 1);
}

#[test]
fn stale_epoch_complete_is_refused_with_failed_precondition() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord =
        Coordinator::start(d, &["--lease-ttl", "1s", "--heartbeat-interval", "200ms"]).unwrap();
    block(async {
        let channel = kiln_proto::connect::channel("url", &coord.url, &Default::default()).unwrap();
        let mut link = kiln_proto::connect::worker_link_client(
            channel.clone(),
            kiln_proto::connect::Bearer::none(),
        );
        let mut farm =
            kiln_proto::connect::farm_client(channel, kiln_proto::connect::Bearer::none());
        link.register(pb::RegisterRequest {
            worker_id: "ghost".into(),
            slots: 1,
            models: vec![pb::ModelInfo {
                name: "tiny".into(),
                hash: "h".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        let spec = kiln_proto::pb::JobSpec {
            defaults: Some(pb::RecipeFields {
                model: Some("tiny".into()),
                prompt: Some("a fox".into()),
                width: Some(64),
                height: Some(64),
                steps: Some(2),
                seed: Some(1),
                ..Default::default()
            }),
            items: vec![pb::RecipeFields::default()],
            ..Default::default()
        };
        let job = farm
            .submit_job(pb::SubmitJobRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap()
            .job_id;
        let lease = |link: &mut pb::worker_link_client::WorkerLinkClient<_>| {
            let mut link = link.clone();
            async move {
                link.lease(pb::LeaseRequest {
                    worker_id: "ghost".into(),
                    max_tasks: 1,
                    wait_ms: 5000,
                    resident_models: vec![],
                    ready_lora_sets: vec![],
                })
                .await
                .unwrap()
                .into_inner()
                .tasks
            }
        };
        let first = lease(&mut link).await.remove(0);
        assert_eq!(first.epoch, 1);
        // No heartbeat: the lease expires, the task is requeued and leased again.
        let second = wait_for_async(Duration::from_secs(20), "a new lease", || {
            let mut link = link.clone();
            async move { lease(&mut link).await.pop() }
        })
        .await;
        assert!(second.epoch > first.epoch);
        let png = png_bytes(64, 64);
        let complete = |epoch: u64| pb::CompleteRequest {
            worker_id: "ghost".into(),
            task_id: first.task_id.clone(),
            epoch,
            sha256: kiln_tests_sha(&png),
            png: png.clone(),
            model_hash: "h".into(),
            timings: None,
            // What a client from before lease_next sends.
            ..Default::default()
        };
        let stale = link.complete(complete(first.epoch)).await.unwrap_err();
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
        // The same worker holds the task again: it did not "go" anywhere.
        assert!(
            stale.message().ends_with(&format!(
                "epoch 1 is stale: worker ghost holds this task under epoch {}",
                second.epoch
            )),
            "{}",
            stale.message()
        );
        let future = second.epoch + 5;
        let never = link.complete(complete(future)).await.unwrap_err();
        assert_eq!(never.code(), tonic::Code::FailedPrecondition, "{never:?}");
        assert!(
            never.message().ends_with(&format!(
                "epoch {future} was never issued for this task; the current lease is epoch {}",
                second.epoch
            )),
            "{}",
            never.message()
        );
        link.complete(complete(second.epoch)).await.unwrap();
        let job_dir = coord.results.join(&job);
        let files = pngs(&job_dir);
        assert_eq!(files.len(), 1);
        assert_eq!(std::fs::read(&files[0]).unwrap(), png);
    });
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn kiln_tests_sha(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn same_idempotency_key_returns_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &[]).unwrap();
    let _w = worker(
        d,
        &coord.url,
        "w1",
        &["--model", "tiny", "--renderer", "sim", "--sim-step", "0ms"],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let batch = d.join("shots.toml");
    std::fs::write(&batch, ISSUE_BATCH).unwrap();
    let submit = || {
        kiln(&[
            "submit",
            arg(&batch),
            "--idempotency-key",
            "shots-v1",
            "--json",
            "--coordinator",
            &coord.url,
        ])
    };
    let (a, b) = (submit(), submit());
    assert_eq!((a.code, b.code), (0, 0), "{} {}", a.stderr, b.stderr);
    let (ja, jb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&a.stdout).unwrap(),
        serde_json::from_str(&b.stdout).unwrap(),
    );
    assert_eq!(ja["job_id"], jb["job_id"]);
    assert_eq!(
        (ja["created"].as_bool(), jb["created"].as_bool()),
        (Some(true), Some(false))
    );
    let job = get_job(&coord.url, ja["job_id"].as_str().unwrap());
    assert_eq!(job.tasks.len(), 9);
    let jobs: serde_json::Value =
        serde_json::from_str(&kiln(&["jobs", "--json", "--coordinator", &coord.url]).stdout)
            .unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "9 tasks, not 18: {jobs}");
}

#[test]
fn bad_input_is_refused_naming_the_field_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &["--model-grace", "0s"]).unwrap();
    let _w = worker(
        d,
        &coord.url,
        "w1",
        &["--model", "tiny", "--renderer", "sim"],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let cases: [(&str, &str, &str, &[&str]); 5] = [
        ("width = 64", "width = 63", "defaults.width", &["63", ":3:"]),
        ("steps = 4", "steps = 0", "defaults.steps", &["0", ":5:"]),
        (
            "model = \"tiny\"",
            "model = \"nope\"",
            "defaults.model",
            &["\"nope\"", ":2:"],
        ),
        (
            "scheduler = \"ddim\"",
            "scheduler = \"plms\"",
            "defaults.scheduler",
            &["\"plms\"", ":7:"],
        ),
        (
            "guidance = 5.0",
            "guidance = = 5.0",
            "not valid TOML",
            &[":6:"],
        ),
    ];
    for (from, to, field, also) in cases {
        let batch = d.join("bad.toml");
        std::fs::write(&batch, ISSUE_BATCH.replace(from, to)).unwrap();
        let r = kiln(&["submit", arg(&batch), "--coordinator", &coord.url]);
        assert_eq!(r.code, 1, "{to:?} must be refused: {}", r.stdout);
        assert!(
            r.stderr.contains(field),
            "{to:?}: the error must name {field}: {}",
            r.stderr
        );
        for text in also {
            assert!(
                r.stderr.contains(text),
                "{to:?}: the error must contain {text}: {}",
                r.stderr
            );
        }
    }
    // The coordinator checks too, whatever client sends the job.
    let status = block(async {
        let mut farm = coord.client().await;
        let spec = pb::JobSpec {
            defaults: Some(pb::RecipeFields {
                model: Some("tiny".into()),
                prompt: Some("x".into()),
                width: Some(63),
                ..Default::default()
            }),
            items: vec![pb::RecipeFields::default()],
            ..Default::default()
        };
        farm.submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("defaults.width:"),
        "{}",
        status.message()
    );
    let jobs = kiln(&["jobs", "--json", "--coordinator", &coord.url]);
    assert_eq!(jobs.stdout.trim(), "[]", "nothing may be queued");
}

#[test]
fn cancelled_job_stops_leasing_and_workers_abandon_within_a_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &["--heartbeat-interval", "300ms"]).unwrap();
    let w = worker(
        d,
        &coord.url,
        "w1",
        &[
            "--model",
            "tiny",
            "--renderer",
            "sim",
            "--sim-step",
            "200ms",
        ],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let batch = d.join("slow.toml");
    sweep_file(&batch, "tiny", 1, 3, 100).unwrap();
    let job = job_id(&kiln(&["submit", arg(&batch), "--json", "--coordinator", &coord.url]).stdout)
        .unwrap();
    wait_for(Duration::from_secs(30), "a running task", || {
        get_job(&coord.url, &job)
            .tasks
            .iter()
            .any(|t| t.step >= 1)
            .then_some(())
    });
    let cancel = kiln(&["cancel", &job, "--coordinator", &coord.url]);
    assert_eq!(cancel.code, 0, "{}", cancel.stderr);
    assert!(cancel.stdout.contains("cancelled"), "{}", cancel.stdout);
    wait_for(
        Duration::from_secs(10),
        "the worker to abandon its task",
        || {
            w.output()
                .contains("task abandoned as the coordinator asked")
                .then_some(())
        },
    );
    let job_now = get_job(&coord.url, &job);
    assert_eq!(
        job_now.job.as_ref().unwrap().state,
        pb::JobState::Cancelled as i32
    );
    assert!(
        job_now
            .tasks
            .iter()
            .all(|t| t.state == TaskState::Cancelled as i32)
    );
    let running = job_now
        .tasks
        .iter()
        .find(|t| !t.attempts.is_empty())
        .unwrap();
    assert_eq!(
        running.attempts.len(),
        1,
        "no task is leased after the cancel"
    );
    assert_eq!(running.attempts[0].outcome, "cancelled");
    assert!(running.step < 100, "the render was stopped mid-way");
    let evs = events(&coord.url, &job);
    let finished = evs
        .iter()
        .position(|e| e.kind == pb::EventKind::JobFinished as i32)
        .unwrap();
    assert!(
        !evs[finished..]
            .iter()
            .any(|e| e.kind == pb::EventKind::Leased as i32)
    );
    let watch = kiln(&["watch", &job, "--coordinator", &coord.url]);
    assert_eq!(
        watch.code, 3,
        "a cancelled job is not a success: {}",
        watch.stdout
    );
}

#[test]
fn sigterm_drains_the_worker_which_finishes_its_task_and_exits_zero() {
    // With --prefetch 1 the worker also holds the next task, waiting: the drain
    // hands it back at once rather than rendering it.
    for prefetch in ["0", "1"] {
        sigterm_drain(prefetch);
    }
}

fn sigterm_drain(prefetch: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &["--heartbeat-interval", "200ms"]).unwrap();
    let mut w = worker(
        d,
        &coord.url,
        "w1",
        &[
            "--model",
            "tiny",
            "--renderer",
            "sim",
            "--sim-step",
            "100ms",
            "--prefetch",
            prefetch,
        ],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let batch = d.join("three.toml");
    // 3 s per task: progress shows at the first heartbeat, long before the task ends.
    sweep_file(&batch, "tiny", 1, 3, 30).unwrap();
    let job = job_id(&kiln(&["submit", arg(&batch), "--json", "--coordinator", &coord.url]).stdout)
        .unwrap();
    wait_for(Duration::from_secs(30), "a running task", || {
        get_job(&coord.url, &job)
            .tasks
            .iter()
            .any(|t| t.step >= 1)
            .then_some(())
    });
    w.signal("TERM");
    assert_eq!(
        w.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        w.output()
    );
    let j = get_job(&coord.url, &job);
    let c = j.job.unwrap().counts.unwrap();
    assert_eq!(
        (c.completed, c.queued, c.leased),
        (1, 2, 0),
        "--prefetch {prefetch}: the task rendering finished, nothing else was taken"
    );
}
