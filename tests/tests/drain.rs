//! Stopping processes the way a cluster does (#12): a SIGTERMed worker
//! finishes what it can within `--drain-timeout` and hands the rest back at
//! once (not after the lease TTL); a second SIGTERM hands back at once; a
//! SIGTERMed coordinator exits 0 and another one on the same Redis finishes
//! the job. Hand-backs are proven by the task's attempts (`cancelled` by the
//! first worker, not `expired`), never by the clock: every lease TTL here is
//! far longer than any deadline the test waits with.

use std::path::Path;
use std::time::Duration;

use kiln_proto::pb;
use kiln_tests::redis::RedisServer;
use kiln_tests::{
    Coordinator, Proc, assert_exactly_once, get_job, submit_text, wait_for, wait_for_workers,
    watch_ok, worker,
};

/// A lease TTL no test here waits for: a task that comes back was handed back.
const LONG_TTL: &str = "1h";

/// How long a process may take to do what the test waits for.
const DEADLINE: Duration = Duration::from_secs(60);

/// Starts a sim worker (model `simtoy`) with `step` per step and `extra` flags.
fn sim(dir: &Path, url: &str, id: &str, step: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["--renderer", "sim", "--model", "simtoy", "--sim-step", step];
    args.extend_from_slice(extra);
    worker(dir, url, id, &args).expect("worker")
}

fn one_task(dir: &Path, url: &str, steps: u32) -> String {
    submit_text(
        dir,
        url,
        "one.toml",
        &format!(
            "[defaults]\nmodel = \"simtoy\"\nwidth = 64\nheight = 64\nsteps = {steps}\n[[items]]\nprompt = \"x\"\nseed = 1\n"
        ),
    )
}

fn task(url: &str, job: &str) -> pb::TaskInfo {
    get_job(url, job)
        .tasks
        .into_iter()
        .next()
        .expect("one task")
}

/// Waits until the job's only task is leased to `worker`.
fn wait_leased(url: &str, job: &str, worker: &str) {
    wait_for(DEADLINE, "the task to be leased", || {
        let t = task(url, job);
        (t.state() == pb::TaskState::Leased
            && t.attempts.last().is_some_and(|a| a.worker_id == worker))
        .then_some(())
    });
}

/// Waits until the worker logged `text` (it handled the signal).
fn wait_logged(p: &Proc, text: &str) {
    wait_for(DEADLINE, text, || p.output().contains(text).then_some(()));
}

/// Asserts that `first` handed the task back and `second` completed it.
fn assert_handed_back(url: &str, job: &str) {
    let t = task(url, job);
    let seen: Vec<(&str, &str)> = t
        .attempts
        .iter()
        .map(|a| (a.worker_id.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        [("first", "cancelled"), ("second", "completed")],
        "attempts"
    );
    assert_eq!(t.attempts[0].fault(), pb::FaultClass::Cancelled);
}

#[test]
fn sigterm_hands_a_long_render_back_after_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &["--lease-ttl", LONG_TTL]).unwrap();
    // One step takes an hour: the render cannot end, nor be cancelled, before
    // the drain timeout; the hand-back must not wait for it.
    let mut first = sim(d, &c.url, "first", "1h", &["--drain-timeout", "1s"]);
    wait_for_workers(&c.url, 1);
    let job = one_task(d, &c.url, 3);
    wait_leased(&c.url, &job, "first");
    first.signal("TERM");
    assert_eq!(
        first.wait_exit(DEADLINE),
        Some(0),
        "the drained worker exits 0: {}",
        first.output()
    );
    assert!(
        first.output().contains("drain timeout"),
        "{}",
        first.output()
    );
    let _second = sim(d, &c.url, "second", "0ms", &[]);
    watch_ok(&c.url, &job);
    assert_handed_back(&c.url, &job);
}

#[test]
fn a_second_sigterm_hands_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &["--lease-ttl", LONG_TTL]).unwrap();
    // Neither the render (an hour a step) nor the drain timeout (an hour) ends
    // before the test's deadline: only the second signal can.
    let mut first = sim(d, &c.url, "first", "1h", &["--drain-timeout", "1h"]);
    wait_for_workers(&c.url, 1);
    let job = one_task(d, &c.url, 3);
    wait_leased(&c.url, &job, "first");
    first.signal("TERM");
    wait_logged(&first, "draining");
    assert_eq!(
        task(&c.url, &job).state(),
        pb::TaskState::Leased,
        "a drain keeps the task in hand"
    );
    first.signal("TERM");
    assert_eq!(
        first.wait_exit(DEADLINE),
        Some(0),
        "the worker exits 0 after handing back: {}",
        first.output()
    );
    assert!(
        first.output().contains("second signal"),
        "{}",
        first.output()
    );
    let _second = sim(d, &c.url, "second", "0ms", &[]);
    watch_ok(&c.url, &job);
    assert_handed_back(&c.url, &job);
}

#[test]
fn a_drain_finishes_the_task_in_hand_and_leases_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &["--lease-ttl", LONG_TTL]).unwrap();
    let mut first = sim(d, &c.url, "first", "100ms", &["--drain-timeout", "1h"]);
    wait_for_workers(&c.url, 1);
    let job = one_task(d, &c.url, 30);
    wait_leased(&c.url, &job, "first");
    first.signal("TERM");
    // A job submitted after the signal is never leased to the draining worker.
    wait_logged(&first, "draining");
    let later = one_task(d, &c.url, 1);
    assert_eq!(
        first.wait_exit(DEADLINE),
        Some(0),
        "the drained worker exits 0: {}",
        first.output()
    );
    let t = task(&c.url, &job);
    assert_eq!(t.state(), pb::TaskState::Completed);
    let seen: Vec<(&str, &str)> = t
        .attempts
        .iter()
        .map(|a| (a.worker_id.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(seen, [("first", "completed")], "finished in hand");
    assert!(
        task(&c.url, &later).attempts.is_empty(),
        "the draining worker leased the later job"
    );
}

#[test]
fn a_sigtermed_coordinator_exits_0_and_another_on_the_same_redis_finishes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let redis = RedisServer::start().unwrap();
    let url = redis.url();
    let flags = ["--store", url.as_str(), "--heartbeat-interval", "500ms"];
    let mut a = Coordinator::start_on(d, "a", 0, &flags).unwrap();
    let port = a.port();
    let _w = sim(d, &a.url, "w", "200ms", &[]);
    wait_for_workers(&a.url, 1);
    let job = one_task(d, &a.url, 20);
    wait_leased(&a.url, &job, "w");
    a.proc.signal("TERM");
    assert_eq!(
        a.proc.wait_exit(DEADLINE),
        Some(0),
        "the coordinator exits 0 with a lease in flight: {}",
        a.proc.output()
    );
    // The replica that takes over answers where the worker and clients look.
    let b = Coordinator::start_on(d, "b", port, &flags).unwrap();
    watch_ok(&b.url, &job);
    assert_exactly_once(&b.url, &job, &d.join("out"), 1);
}
