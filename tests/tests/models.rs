//! Model identity between real processes (issue 10, "Model identity"; issue
//! 11, `kiln models`): a name means the hash most live workers hold; a
//! worker announcing another hash, drained or not, does not re-pin jobs;
//! `kiln workers` marks the mismatch; a job whose pinned hash has no live
//! holder fails after `--model-grace` with an error that says so. Sim
//! workers hold `simtoy` under `sim:simtoy`; the other hashes come from
//! plain gRPC `Register` calls, as a foreign client would make them.

use std::path::Path;
use std::time::Duration;

use kiln_proto::connect::{Bearer, channel, worker_link_client};
use kiln_proto::pb::{self, JobState, TaskState};
use kiln_tests::{
    Coordinator, arg, block, events, get_job, job_id, kiln, sim_worker, sweep_file, wait_for,
    wait_for_workers, watch_ok, worker,
};

/// The hash every sim worker announces for `simtoy`.
const SIM_HASH: &str = "sim:simtoy";

/// Registers a worker that holds `simtoy` under `hash` and never asks for work.
fn register_foreign(url: &str, id: &str, hash: &str) {
    block(async {
        let mut link = worker_link_client(
            channel("url", url, &Default::default()).expect("valid URL"),
            Bearer::none(),
        );
        link.register(pb::RegisterRequest {
            worker_id: id.into(),
            slots: 1,
            models: vec![pb::ModelInfo {
                name: "simtoy".into(),
                hash: hash.into(),
            }],
            determinism_class: "sim/v1".into(),
            ..Default::default()
        })
        .await
        .expect("Register");
    });
}

/// Submits `n` simtoy images of `steps` steps; returns the job id.
fn submit(d: &Path, url: &str, name: &str, n: usize, steps: u32) -> String {
    let file = d.join(name);
    sweep_file(&file, "simtoy", 1, n, steps).unwrap();
    let out = kiln(&["submit", arg(&file), "--json", "--coordinator", url]);
    assert_eq!(out.code, 0, "submit: {}", out.stderr);
    job_id(&out.stdout).unwrap()
}

fn models_json(url: &str) -> serde_json::Value {
    let out = kiln(&["models", "--json", "--coordinator", url]);
    assert_eq!(out.code, 0, "kiln models: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("kiln models --json prints JSON")
}

#[test]
fn a_drained_worker_announcing_another_hash_does_not_stop_the_next_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &[]).unwrap();
    let _good = sim_worker(d, &coord.url, "good", &[], &[]).unwrap();
    wait_for_workers(&coord.url, 1);
    // Another build of the model, under a hash that wins a tie, then drained.
    register_foreign(&coord.url, "rogue", "0000000000000000aaaa");
    let drain = kiln(&["drain", "rogue", "--coordinator", &coord.url]);
    assert_eq!(drain.code, 0, "drain: {}", drain.stderr);

    let job = submit(d, &coord.url, "next.toml", 3, 2);
    watch_ok(&coord.url, &job);
    let done = get_job(&coord.url, &job);
    assert_eq!(done.tasks.len(), 3);
    for t in &done.tasks {
        let recipe = t.recipe.as_ref().expect("recipe");
        assert_eq!(
            recipe.model_hash, SIM_HASH,
            "pinned to the live worker's hash"
        );
        assert_eq!(t.state, TaskState::Completed as i32);
        assert_eq!(
            t.attempts.last().map(|a| a.worker_id.as_str()),
            Some("good")
        );
    }
    let models = models_json(&coord.url);
    let simtoy = &models[0];
    assert_eq!(simtoy["name"], "simtoy", "{models}");
    assert_eq!(
        simtoy["hashes"].as_array().map(Vec::len),
        Some(1),
        "a drained worker holds nothing the farm counts: {models}"
    );
    assert_eq!(simtoy["hashes"][0]["hash"], SIM_HASH);
}

#[test]
fn kiln_workers_marks_a_mismatch_and_kiln_models_lists_every_hash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &[]).unwrap();
    let _w1 = sim_worker(d, &coord.url, "good-1", &[], &[]).unwrap();
    let _w2 = sim_worker(d, &coord.url, "good-2", &[], &[]).unwrap();
    wait_for_workers(&coord.url, 2);
    // Sorts first, but one live worker against two.
    register_foreign(&coord.url, "odd", "abc123def4567890ffff");
    // The coordinator says so in its log (written as it goes: poll for it).
    wait_for(Duration::from_secs(20), "the mismatch warning", || {
        coord
            .proc
            .output()
            .lines()
            .any(|l| {
                l.contains("another build of the model")
                    && l.contains("worker=odd")
                    && l.contains("hash=abc123def456")
            })
            .then_some(())
    });

    let out = kiln(&["workers", "--coordinator", &coord.url]);
    assert_eq!(out.code, 0, "kiln workers: {}", out.stderr);
    let odd_line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("odd "))
        .unwrap_or_else(|| panic!("no line for odd in:\n{}", out.stdout));
    assert!(
        odd_line.contains("simtoy (mismatch: abc123def456, farm: sim:simtoy)"),
        "{}",
        out.stdout
    );
    for good in ["good-1", "good-2"] {
        let line = out.stdout.lines().find(|l| l.starts_with(good)).unwrap();
        assert!(!line.contains("mismatch"), "{line}");
    }
    let json = kiln(&["workers", "--json", "--coordinator", &coord.url]);
    let workers: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let odd = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == "odd")
        .unwrap();
    assert_eq!(odd["models"][0]["mismatch"], true, "{odd}");
    assert_eq!(odd["models"][0]["farm_hash"], SIM_HASH, "{odd}");

    // The job pins the majority's hash; the odd worker gets none of it.
    let job = submit(d, &coord.url, "job.toml", 4, 2);
    watch_ok(&coord.url, &job);
    for t in &get_job(&coord.url, &job).tasks {
        let by = t.attempts.last().map(|a| a.worker_id.clone()).unwrap();
        assert!(by.starts_with("good-"), "task rendered by {by}");
    }

    let text = kiln(&["models", "--coordinator", &coord.url]);
    assert_eq!(text.code, 0, "kiln models: {}", text.stderr);
    assert!(text.stdout.contains("sim:simtoy*"), "{}", text.stdout);
    let models = models_json(&coord.url);
    let simtoy = models
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "simtoy")
        .unwrap_or_else(|| panic!("no simtoy in {models}"));
    let hashes = simtoy["hashes"].as_array().unwrap();
    assert_eq!(hashes.len(), 2, "{simtoy}");
    assert_eq!(hashes[0]["hash"], SIM_HASH);
    assert_eq!(hashes[0]["chosen"], true);
    assert_eq!(
        hashes[0]["workers"],
        serde_json::json!(["good-1", "good-2"])
    );
    assert_eq!(hashes[1]["hash"], "abc123def4567890ffff");
    assert_eq!(hashes[1]["chosen"], false);
    assert_eq!(hashes[1]["workers"], serde_json::json!(["odd"]));
    let resident = simtoy["resident"].as_array().unwrap();
    assert!(
        resident.contains(&"good-1".into()) && resident.contains(&"good-2".into()),
        "{simtoy}"
    );
    assert_eq!(
        (simtoy["queued"].as_u64(), simtoy["running"].as_u64()),
        (Some(0), Some(0))
    );
}

#[test]
fn a_job_whose_pinned_hash_loses_its_live_workers_fails_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &["--model-grace", "2s"]).unwrap();
    // One task at a time, half a second a step: the job outlasts the drain.
    let mut holder = worker(
        d,
        &coord.url,
        "holder",
        &[
            "--renderer",
            "sim",
            "--model",
            "simtoy",
            "--sim-step",
            "500ms",
        ],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let job = submit(d, &coord.url, "job.toml", 8, 2);
    wait_for(Duration::from_secs(60), "the first lease", || {
        get_job(&coord.url, &job)
            .tasks
            .iter()
            .any(|t| t.state == TaskState::Leased as i32)
            .then_some(())
    });
    let drain = kiln(&["drain", "holder", "--coordinator", &coord.url]);
    assert_eq!(drain.code, 0, "drain: {}", drain.stderr);
    // A live worker with another build of the model: it must not take the tasks.
    register_foreign(&coord.url, "other", "feedfacecafe00001111");

    let finished = wait_for(Duration::from_secs(60), "the job to end", || {
        let j = get_job(&coord.url, &job);
        let job = j.job.as_ref()?;
        (job.state != JobState::Running as i32).then_some(j)
    });
    let summary = finished.job.as_ref().unwrap();
    assert_eq!(summary.state, JobState::Failed as i32);
    let counts = summary.counts.unwrap();
    assert!(counts.completed >= 1, "the held task completed: {counts:?}");
    assert!(counts.failed >= 1, "{counts:?}");
    assert_eq!(counts.completed + counts.failed, 8, "{counts:?}");
    let failures: Vec<pb::JobEvent> = events(&coord.url, &job)
        .into_iter()
        .filter(|e| e.kind == pb::EventKind::Failed as i32)
        .collect();
    assert_eq!(failures.len() as u32, counts.failed);
    for e in &failures {
        assert_eq!(e.fault, pb::FaultClass::ModelUnavailable as i32, "{e:?}");
        assert!(e.worker_id.is_empty(), "never leased: {e:?}");
        assert!(
            e.message
                .contains("model \"simtoy\" at its pinned hash sim:simtoy")
                && e.message.contains("--model-grace (2s)")
                && e.message
                    .contains("live workers hold it at feedfacecafe (1 worker) instead"),
            "{}",
            e.message
        );
    }
    // `kiln watch` says so too, and exits non-zero.
    let watch = kiln(&["watch", &job, "--coordinator", &coord.url]);
    assert_ne!(watch.code, 0);
    assert!(
        watch
            .stderr
            .lines()
            .any(|l| l.contains("failed (ModelUnavailable): no live worker held model \"simtoy\"")),
        "{}",
        watch.stderr
    );
    holder.wait_exit(Duration::from_secs(30));
}
