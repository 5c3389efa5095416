//! Issue #5: series, the scheduling policy, dedupe and verification, through
//! real processes. The policy tests use `sim` workers: what they check is the
//! coordinator's choices, visible in the attempt history.

use std::path::Path;
use std::time::Duration;

use kiln_proto::pb;
use kiln_tests::*;

fn sim(dir: &Path, url: &str, id: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--renderer", "sim"];
    args.extend_from_slice(extra);
    worker(dir, url, id, &args).expect("worker")
}

fn watch(url: &str, job: &str) -> i32 {
    kiln(&["watch", job, "--coordinator", url]).code
}

/// Every attempt of a job: (task index, worker, model, started, ended).
fn attempts(url: &str, job: &str) -> Vec<(u32, String, String, i64, i64)> {
    get_job(url, job)
        .tasks
        .iter()
        .flat_map(|t| {
            let model = t
                .recipe
                .as_ref()
                .map(|r| r.model.clone())
                .unwrap_or_default();
            t.attempts.iter().map(move |a| {
                (
                    t.index,
                    a.worker_id.clone(),
                    model.clone(),
                    a.started_at_ms,
                    a.ended_at_ms,
                )
            })
        })
        .collect()
}

#[test]
fn no_shot_is_leased_before_its_anchor_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &[]).unwrap();
    let _w: Vec<Proc> = (0..3)
        .map(|i| {
            sim(
                d,
                &c.url,
                &format!("w{i}"),
                &["--model", "tiny", "--sim-step", "30ms"],
            )
        })
        .collect();
    wait_for_workers(&c.url, 3);
    let job = submit_text(d, &c.url, "mira.toml", MIRA);
    assert_eq!(watch(&c.url, &job), 0);
    let tasks = get_job(&c.url, &job).tasks;
    assert_eq!(tasks.len(), 4);
    assert_eq!((tasks[0].series.as_str(), tasks[0].shot), ("mira", 0));
    let anchor_done = tasks[0]
        .attempts
        .iter()
        .find(|a| a.outcome == "completed")
        .map(|a| a.ended_at_ms)
        .expect("the anchor completed");
    for shot in &tasks[1..] {
        assert_eq!(shot.depends_on, Some(0));
        assert_eq!(
            shot.recipe.as_ref().unwrap().init_image,
            tasks[0].sha256,
            "shots start from the anchor"
        );
        for a in &shot.attempts {
            assert!(
                a.started_at_ms >= anchor_done,
                "shot {} leased before its anchor completed",
                shot.shot
            );
        }
    }
    let out = d.join("out");
    assert_eq!(
        kiln(&["fetch", &job, "--out", arg(&out), "--coordinator", &c.url]).code,
        0
    );
    assert_eq!(pngs(&out).len(), 4);
    let sheet = decode_png(&out.join("mira").join("contact-sheet.png")).unwrap();
    assert!(sheet.width > 64 && sheet.height > 64);
    let lines = manifest(&out).unwrap();
    assert!(
        lines
            .iter()
            .all(|l| l["determinism_class"] == "sim/v1" && l["series"] == "mira")
    );
}

#[test]
fn a_small_job_is_not_starved_by_a_big_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &[]).unwrap();
    let _w1 = sim(d, &c.url, "w1", &["--model", "tiny", "--sim-step", "5ms"]);
    let _w2 = sim(d, &c.url, "w2", &["--model", "tiny", "--sim-step", "5ms"]);
    wait_for_workers(&c.url, 2);
    let big_file = d.join("big.toml");
    sweep_file(&big_file, "tiny", 50, 10, 2).unwrap();
    let big = job_id(&kiln(&["submit", arg(&big_file), "--json", "--coordinator", &c.url]).stdout)
        .unwrap();
    let small_file = d.join("small.toml");
    sweep_file(&small_file, "tiny", 1, 10, 3).unwrap();
    let small = job_id(
        &kiln(&[
            "submit",
            arg(&small_file),
            "--json",
            "--coordinator",
            &c.url,
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!(watch(&c.url, &small), 0);
    let small_done = get_job(&c.url, &small).job.unwrap().finished_at_ms;
    let big_started_before = attempts(&c.url, &big)
        .iter()
        .filter(|a| a.3 <= small_done)
        .count();
    assert!(
        big_started_before < 100,
        "the 10-item job finished after {big_started_before} of the 500 big items had started"
    );
    assert_eq!(watch(&c.url, &big), 0);
}

#[test]
fn a_higher_priority_job_overtakes_at_the_next_lease() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &[]).unwrap();
    let _w = sim(d, &c.url, "w1", &["--model", "tiny", "--sim-step", "20ms"]);
    wait_for_workers(&c.url, 1);
    let low_file = d.join("low.toml");
    sweep_file(&low_file, "tiny", 10, 10, 2).unwrap();
    let low = job_id(&kiln(&["submit", arg(&low_file), "--json", "--coordinator", &c.url]).stdout)
        .unwrap();
    wait_for(Duration::from_secs(30), "the low job to start", || {
        (get_job(&c.url, &low).job?.counts?.completed >= 3).then_some(())
    });
    let high_file = d.join("high.toml");
    sweep_file(&high_file, "tiny", 1, 5, 2).unwrap();
    let text = format!(
        "priority = 10\n{}",
        std::fs::read_to_string(&high_file).unwrap()
    );
    let high = submit_text(d, &c.url, "high.toml", &text);
    assert_eq!(watch(&c.url, &high), 0);
    let high_created = get_job(&c.url, &high).job.unwrap().created_at_ms;
    let high_done = get_job(&c.url, &high).job.unwrap().finished_at_ms;
    let low_leased_between = attempts(&c.url, &low)
        .iter()
        .filter(|a| a.3 > high_created && a.3 < high_done)
        .count();
    assert!(
        low_leased_between <= 1,
        "{low_leased_between} low-priority tasks were leased while the high-priority job waited"
    );
    kiln(&["cancel", &low, "--coordinator", &c.url]);
}

#[test]
fn no_worker_loads_another_model_while_its_own_has_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &[]).unwrap();
    let common = [
        "--sim-resident",
        "1",
        "--sim-load",
        "300ms",
        "--sim-step",
        "10ms",
    ];
    let mut a_args = vec!["--model", "m1", "--model", "m2"];
    a_args.extend_from_slice(&common);
    let mut b_args = vec!["--model", "m2", "--model", "m1"];
    b_args.extend_from_slice(&common);
    let _a = sim(d, &c.url, "a", &a_args);
    let _b = sim(d, &c.url, "b", &b_args);
    wait_for_workers(&c.url, 2);
    // One job with work for both models from the start.
    let text = "[defaults]\nwidth = 64\nheight = 64\nsteps = 2\nprompt = \"x\"\n[sweep]\nmodel = [\"m1\", \"m2\"]\nseed = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]\n";
    let job = submit_text(d, &c.url, "both.toml", text);
    assert_eq!(watch(&c.url, &job), 0);
    let all = attempts(&c.url, &job);
    for (worker, own, other) in [("a", "m1", "m2"), ("b", "m2", "m1")] {
        assert!(
            all.iter().any(|x| x.1 == worker && x.2 == own),
            "worker {worker} rendered its own model"
        );
        let last_own_start = all
            .iter()
            .filter(|x| x.2 == own)
            .map(|x| x.3)
            .max()
            .unwrap();
        if let Some(first_switch) = all
            .iter()
            .filter(|x| x.1 == worker && x.2 == other)
            .map(|x| x.3)
            .min()
        {
            assert!(
                first_switch >= last_own_start,
                "worker {worker} loaded {other} while {own} still had waiting work"
            );
        }
    }
}

#[test]
fn a_worker_failing_every_task_is_quarantined_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &[]).unwrap();
    // Its prefetch place holds one task leased before its third fault is
    // reported: quarantine reaches the worker one task later.
    let _bad = sim(
        d,
        &c.url,
        "bad",
        &["--model", "tiny", "--sim-fail", "--prefetch", "1"],
    );
    let _good = sim(
        d,
        &c.url,
        "good",
        &["--model", "tiny", "--sim-step", "20ms"],
    );
    wait_for_workers(&c.url, 2);
    let file = d.join("b.toml");
    sweep_file(&file, "tiny", 4, 5, 2).unwrap();
    let job =
        job_id(&kiln(&["submit", arg(&file), "--json", "--coordinator", &c.url]).stdout).unwrap();
    assert_eq!(
        watch(&c.url, &job),
        0,
        "the job completes on the good worker"
    );
    let by_bad: Vec<_> = attempts(&c.url, &job)
        .into_iter()
        .filter(|a| a.1 == "bad")
        .collect();
    assert!(!by_bad.is_empty(), "the bad worker took part");
    assert!(
        by_bad.len() <= 3 + 1,
        "quarantined after 3 faults (and the one task prefetched), but it got {} tasks",
        by_bad.len()
    );
    let tasks = get_job(&c.url, &job).tasks;
    for t in &tasks {
        for a in t.attempts.iter().filter(|a| a.worker_id == "bad") {
            assert_eq!(
                a.fault,
                pb::FaultClass::Internal as i32,
                "fault classes are recorded"
            );
        }
    }
}

#[test]
fn resubmitting_a_series_with_one_shot_changed_renders_one_task() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &[]).unwrap();
    let _w1 = sim(d, &c.url, "w1", &["--model", "tiny", "--sim-step", "10ms"]);
    let _w2 = sim(d, &c.url, "w2", &["--model", "tiny", "--sim-step", "10ms"]);
    wait_for_workers(&c.url, 2);
    let rendered = |job: &str| attempts(&c.url, job).iter().filter(|a| a.4 > 0).count();
    let first = submit_text(d, &c.url, "mira.toml", MIRA);
    assert_eq!(watch(&c.url, &first), 0);
    assert_eq!(rendered(&first), 4);
    let same = submit_text(d, &c.url, "mira.toml", MIRA);
    assert_eq!(watch(&c.url, &same), 0);
    assert_eq!(rendered(&same), 0, "nothing changed: nothing is rendered");
    let edited = MIRA.replace(
        "reading a map by candlelight in a library",
        "reading a map by moonlight on a ship",
    );
    let changed = submit_text(d, &c.url, "mira-2.toml", &edited);
    assert_eq!(watch(&c.url, &changed), 0);
    let attempts = attempts(&c.url, &changed);
    assert_eq!(
        attempts.len(),
        1,
        "only the edited shot renders: {attempts:?}"
    );
    assert_eq!(attempts[0].0, 2);
    let out = d.join("out");
    assert_eq!(
        kiln(&[
            "fetch",
            &changed,
            "--out",
            arg(&out),
            "--coordinator",
            &c.url
        ])
        .code,
        0
    );
    assert_eq!(
        pngs(&out).len(),
        4,
        "served items are fetched like rendered ones"
    );
}

#[test]
fn verify_finds_a_finished_job_identical_and_catches_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &[]).unwrap();
    let _w1 = sim(d, &c.url, "w1", &["--model", "tiny", "--sim-step", "10ms"]);
    let _w2 = sim(d, &c.url, "w2", &["--model", "tiny", "--sim-step", "10ms"]);
    wait_for_workers(&c.url, 2);
    let job = submit_text(d, &c.url, "mira.toml", MIRA);
    assert_eq!(watch(&c.url, &job), 0);
    let ok = kiln(&["verify", &job, "--coordinator", &c.url]);
    assert_eq!(ok.code, 0, "{}\n{}", ok.stdout, ok.stderr);
    assert!(
        ok.stdout.contains("4 of 4 items byte-identical"),
        "{}",
        ok.stdout
    );
    // Verification renders happen on the other worker where there is one.
    let verify_job = get_job(
        &c.url,
        &job_id(&kiln(&["jobs", "--json", "--coordinator", &c.url]).stdout).unwrap(),
    );
    let originals = get_job(&c.url, &job).tasks;
    for (v, t) in verify_job.tasks.iter().zip(&originals) {
        assert_ne!(
            v.attempts[0].worker_id,
            t.attempts.last().unwrap().worker_id
        );
    }
    let victim = pngs(&c.results.join(&job)).pop().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&victim, bytes).unwrap();
    let bad = kiln(&["verify", &job, "--sample", "4", "--coordinator", &c.url]);
    assert_ne!(
        bad.code, 0,
        "a tampered file must fail verification: {}",
        bad.stdout
    );
    assert!(bad.stdout.contains("DIFFERENT"), "{}", bad.stdout);
}
