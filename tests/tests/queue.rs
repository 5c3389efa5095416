//! Queue control and usage between real processes (issue 11): `kiln retry`
//! of a job whose tasks a failing sim worker failed, `kiln pause` and
//! `kiln resume`, `kiln priority`, `kiln usage`, and who may do each.

use std::path::Path;
use std::time::Duration;

use kiln_proto::pb;
use kiln_tests::redis::RedisServer;
use kiln_tests::{
    Coordinator, Output, arg, get_job, job_id, kiln, kiln_env, manifest, pngs, sim_worker,
    submit_text, sweep_file, wait_for, wait_for_workers, watch_ok,
};

/// A 2 x 2 sweep of `model` at 64 px in `project` (none: the default one).
fn sweep(dir: &Path, name: &str, model: &str, project: Option<&str>) -> String {
    let path = dir.join(name);
    sweep_file(&path, model, 2, 2, 2).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    match project {
        Some(p) => format!("project = \"{p}\"\n{text}"),
        None => text,
    }
}

/// Runs `kiln ARGS --coordinator URL` and asserts it succeeded.
fn ok(url: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--coordinator", url]);
    let out = kiln(&all);
    assert_eq!(out.code, 0, "kiln {args:?}: {}\n{}", out.stdout, out.stderr);
    out
}

/// Lets a sim worker announce its model (admission checks models) and stops
/// it, so jobs submitted next wait in the queue until a worker starts.
fn announce(dir: &Path, url: &str, extra: &[&str]) {
    let mut w = sim_worker(dir, url, "announcer", extra, &[]).unwrap();
    wait_for_workers(url, 1);
    w.kill();
}

fn job_state(url: &str, job: &str) -> pb::JobSummary {
    get_job(url, job).job.expect("GetJob returned a job")
}

fn wait_state(url: &str, job: &str, state: pb::JobState) -> pb::JobSummary {
    wait_for(Duration::from_secs(60), "the job's state", || {
        let j = job_state(url, job);
        (j.state == state as i32).then_some(j)
    })
}

#[test]
fn a_failed_job_is_retried_and_completes_with_its_manifest_and_usage() {
    retried_to_completion(&[]);
}

#[test]
fn a_failed_job_is_retried_on_redis() {
    let redis = RedisServer::start().unwrap();
    retried_to_completion(&["--store", &redis.url()]);
}

/// A job a failing worker failed, retried on a good worker: every image
/// fetched, the manifest complete, usage counted (coordinator flags `extra`).
fn retried_to_completion(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut flags = vec!["--max-attempts", "1"];
    flags.extend_from_slice(extra);
    let c = Coordinator::start(d, &flags).unwrap();
    let mut bad = sim_worker(d, &c.url, "bad", &["--model", "tiny", "--sim-fail"], &[]).unwrap();
    wait_for_workers(&c.url, 1);
    let job = submit_text(d, &c.url, "b.toml", &sweep(d, "s.toml", "tiny", None));
    let failed = wait_state(&c.url, &job, pb::JobState::Failed);
    assert_eq!(failed.counts.unwrap().failed, 4);
    bad.kill();

    let mut good = sim_worker(d, &c.url, "good", &["--model", "tiny"], &[]).unwrap();
    let out = ok(&c.url, &["retry", &job, "--failed", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["requeued"], 4, "{v}");
    assert_eq!(v["job"]["state"], "running", "{v}");
    watch_ok(&c.url, &job);
    let done = job_state(&c.url, &job);
    assert_eq!(done.counts.unwrap().completed, 4);
    // Every task keeps its failed attempt beside the one that completed.
    for t in get_job(&c.url, &job).tasks {
        assert_eq!(t.attempts.len(), 2, "{t:?}");
        assert_eq!(t.attempts[0].outcome, "failed");
    }
    let out_dir = d.join("out");
    ok(&c.url, &["fetch", &job, "--out", arg(&out_dir)]);
    assert_eq!(pngs(&out_dir).len(), 4);
    let lines = manifest(&out_dir).unwrap();
    assert_eq!(lines.len(), 4);
    assert!(
        lines.iter().all(|l| l["status"] == "completed"),
        "{lines:?}"
    );
    // A second retry finds nothing failed.
    let again = ok(&c.url, &["retry", &job]);
    assert!(
        again.stdout.contains(" 0 failed tasks back"),
        "{}",
        again.stdout
    );

    // Usage: 4 images and 4 failed attempts of model tiny in the default project.
    let out = ok(&c.url, &["usage", "--json", "--since", "1h"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let rows = v["usage"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(
        (&rows[0]["project"], &rows[0]["model"]),
        (&"default".into(), &"tiny".into())
    );
    assert_eq!(
        (&rows[0]["images"], &rows[0]["failed_attempts"]),
        (&4.into(), &4.into())
    );
    assert!(rows[0]["render_seconds"].as_f64().unwrap() >= 0.0);
    let table = ok(&c.url, &["usage"]).stdout;
    assert!(
        table.contains("default") && table.contains("tiny"),
        "{table}"
    );
    let other = ok(&c.url, &["usage", "--json", "--project", "elsewhere"]).stdout;
    let v: serde_json::Value = serde_json::from_str(&other).unwrap();
    assert!(v["usage"].as_array().unwrap().is_empty(), "{v}");
    good.kill();
}

#[test]
fn a_paused_job_waits_while_others_run_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let c = Coordinator::start(d, &[]).unwrap();
    announce(d, &c.url, &[]);
    let held = submit_text(d, &c.url, "a.toml", &sweep(d, "a", "simtoy", None));
    let out = ok(&c.url, &["pause", &held]);
    assert!(out.stdout.contains("paused"), "{}", out.stdout);
    let listed = ok(&c.url, &["jobs", "--json"]).stdout;
    let jobs: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entry = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_id"] == held.as_str())
        .unwrap();
    assert_eq!(
        (&entry["state"], &entry["paused"]),
        (&"paused".into(), &true.into())
    );
    assert!(ok(&c.url, &["jobs"]).stdout.contains("paused"));

    let mut w = sim_worker(d, &c.url, "w1", &[], &[]).unwrap();
    // Other recipes (3 steps): the paused job is rendered, not served from these.
    let text = sweep(d, "b", "simtoy", None).replace("steps = 2", "steps = 3");
    let other = submit_text(d, &c.url, "b.toml", &text);
    watch_ok(&c.url, &other);
    // The other job ran to the end; nothing of the paused one was leased.
    let paused = job_state(&c.url, &held);
    assert!(paused.paused);
    assert_eq!(paused.counts.unwrap().queued, 4);
    assert!(
        get_job(&c.url, &held)
            .tasks
            .iter()
            .all(|t| t.attempts.is_empty())
    );

    let out = ok(&c.url, &["resume", &held]);
    assert!(out.stdout.contains("running"), "{}", out.stdout);
    watch_ok(&c.url, &held);
    assert_eq!(job_state(&c.url, &held).counts.unwrap().completed, 4);
    assert!(
        get_job(&c.url, &held)
            .tasks
            .iter()
            .all(|t| t.attempts.len() == 1)
    );
    w.kill();
}

#[test]
fn a_raised_priority_runs_a_later_job_first() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let c = Coordinator::start(d, &[]).unwrap();
    announce(d, &c.url, &[]);
    let first = submit_text(d, &c.url, "a.toml", &sweep(d, "a", "simtoy", None));
    // Other recipes (3 steps), so nothing is served from the first job's results.
    let text = sweep(d, "b", "simtoy", None).replace("steps = 2", "steps = 3");
    let later = submit_text(d, &c.url, "b.toml", &text);
    let out = ok(&c.url, &["priority", &later, "5"]);
    assert!(out.stdout.contains("priority 5"), "{}", out.stdout);
    assert_eq!(job_state(&c.url, &later).priority, 5);
    // One slot: tasks are leased one after another, in policy order.
    let mut w = sim_worker(d, &c.url, "w1", &["--slots", "1"], &[]).unwrap();
    watch_ok(&c.url, &first);
    watch_ok(&c.url, &later);
    let starts = |job: &str| -> Vec<i64> {
        get_job(&c.url, job)
            .tasks
            .iter()
            .map(|t| t.attempts[0].started_at_ms)
            .collect()
    };
    let (a, b) = (starts(&first), starts(&later));
    assert!(
        b.iter().max() <= a.iter().min(),
        "the raised job's tasks were all leased first: {b:?} then {a:?}"
    );
    // A finished job's priority stays: said, and a failure exit.
    let out = kiln(&["priority", &first, "9", "--coordinator", &c.url]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("completed"), "{}", out.stderr);
    w.kill();
}

/// A token made by `kiln token new`, and its `[[token]]` block.
fn new_token(name: &str, role: &str, projects: &[&str]) -> (String, String) {
    let mut args = vec!["token", "new", "--name", name, "--role", role, "--json"];
    for p in projects {
        args.extend_from_slice(&["--project", p]);
    }
    let out = kiln(&args);
    assert_eq!(out.code, 0, "token new: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["block"].as_str().unwrap().to_string(),
    )
}

fn kiln_as(token: &str, url: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--coordinator", url]);
    kiln_env(&all, &[("KILN_TOKEN", token)])
}

/// [`announce`] under a worker token (`wait_for_workers` has none).
fn announce_as(dir: &Path, url: &str, token: &str, file: &Path) {
    let mut w = sim_worker(dir, url, "announcer", &["--token-file", arg(file)], &[]).unwrap();
    wait_for(Duration::from_secs(60), "the worker to register", || {
        let out = kiln_as(token, url, &["workers", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        (!list.as_array()?.is_empty()).then_some(())
    });
    w.kill();
}

fn refused(out: &Output, says: &str) {
    assert_ne!(out.code, 0, "expected a refusal: {}", out.stdout);
    assert!(
        out.stderr.contains(says),
        "expected {says:?} in: {}",
        out.stderr
    );
}

#[test]
fn queue_control_follows_roles_and_projects() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (admin, admin_block) = new_token("ops-admin", "admin", &[]);
    let (sub_a, sub_a_block) = new_token("studio-a", "submitter", &["a"]);
    let (sub_b, sub_b_block) = new_token("studio-b", "submitter", &["b"]);
    let (viewer_a, viewer_a_block) = new_token("viewer-a", "viewer", &["a"]);
    let (worker, worker_block) = new_token("nodes", "worker", &[]);
    let auth = d.join("auth.toml");
    std::fs::write(
        &auth,
        format!("{admin_block}\n{sub_a_block}\n{sub_b_block}\n{viewer_a_block}\n{worker_block}\n"),
    )
    .unwrap();
    let c = Coordinator::start(d, &["--auth", arg(&auth)]).unwrap();
    let w_file = d.join("worker.token");
    std::fs::write(&w_file, format!("{worker}\n")).unwrap();
    announce_as(d, &c.url, &worker, &w_file);
    let file = d.join("a.toml");
    std::fs::write(&file, sweep(d, "a", "simtoy", Some("a"))).unwrap();
    let out = kiln_as(&sub_a, &c.url, &["submit", arg(&file), "--json"]);
    assert_eq!(out.code, 0, "submit: {}", out.stderr);
    let job = job_id(&out.stdout).unwrap();

    // A viewer reads but may not steer.
    for cmd in [
        vec!["retry", job.as_str()],
        vec!["pause", job.as_str()],
        vec!["resume", job.as_str()],
        vec!["priority", job.as_str(), "3"],
    ] {
        refused(&kiln_as(&viewer_a, &c.url, &cmd), "permission denied");
    }
    // Another project's submitter: answered like a missing job.
    for cmd in [
        vec!["retry", job.as_str()],
        vec!["pause", job.as_str()],
        vec!["priority", job.as_str(), "3"],
    ] {
        refused(&kiln_as(&sub_b, &c.url, &cmd), "not found");
    }
    // The owner's submitter steers its job.
    let out = kiln_as(&sub_a, &c.url, &["pause", &job]);
    assert_eq!(out.code, 0, "pause: {}", out.stderr);
    let out = kiln_as(&sub_a, &c.url, &["priority", &job, "3", "--json"]);
    assert_eq!(out.code, 0, "priority: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((&v["priority"], &v["state"]), (&3.into(), &"paused".into()));
    // The admin resumes it, which leaves an audit line.
    let out = kiln_as(&admin, &c.url, &["resume", &job]);
    assert_eq!(out.code, 0, "resume: {}", out.stderr);
    wait_for(Duration::from_secs(10), "the audit line", || {
        c.proc
            .output()
            .lines()
            .any(|l| l.contains("kiln::audit") && l.contains("ops-admin") && l.contains(&job))
            .then_some(())
    });

    // Usage is a read: a viewer sees its projects only, b sees none of a's.
    let mut w = sim_worker(d, &c.url, "w1", &["--token-file", arg(&w_file)], &[]).unwrap();
    let out = kiln_as(&sub_a, &c.url, &["watch", &job]);
    assert_eq!(out.code, 0, "watch: {}", out.stderr);
    let usage = |token: &str| -> serde_json::Value {
        let out = kiln_as(token, &c.url, &["usage", "--json"]);
        assert_eq!(out.code, 0, "usage: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    };
    let seen = usage(&viewer_a);
    assert_eq!(seen["usage"][0]["project"], "a", "{seen}");
    assert_eq!(seen["usage"][0]["images"], 4, "{seen}");
    assert!(usage(&sub_b)["usage"].as_array().unwrap().is_empty());
    w.kill();
}
