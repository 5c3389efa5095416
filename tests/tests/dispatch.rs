//! The dispatch path between real processes (#15): a worker's Complete brings
//! its next lease back, so a one-slot worker makes one call per task rather
//! than a Lease and a Complete; every task is still rendered exactly once.
//! A worker started with `--prefetch 1` holds its next task while it renders one.

use std::path::Path;
use std::time::Duration;

use kiln_tests::{
    Coordinator, Proc, arg, assert_exactly_once, free_port, get_job, http_get, job_id, kiln,
    sweep_file, wait_for, watch_ok, worker,
};

const LONG: Duration = Duration::from_secs(120);

/// Returns the count of `kiln_rpc_seconds` for one WorkerLink method and
/// gRPC code, 0 when absent.
fn calls(metrics: &str, method: &str, code: &str) -> f64 {
    let wanted = format!("method=\"/kiln.v1.WorkerLink/{method}\"");
    let code = format!("code=\"{code}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("kiln_rpc_seconds_count{"))
        .filter(|l| l.contains(&wanted) && l.contains(&code))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Starts a sim worker `w1` of `step` a step with `flags` on `coord`, runs a
/// job of `prompts` x `seeds` two-step items on it and checks that every item
/// was rendered exactly once; returns the worker and the job.
fn run_job(
    d: &Path,
    coord: &Coordinator,
    step: &str,
    flags: &[&str],
    (prompts, seeds): (usize, usize),
) -> (Proc, String) {
    let mut args = vec!["--renderer", "sim", "--model", "simtoy", "--sim-step", step];
    args.extend_from_slice(flags);
    let w = worker(d, &coord.url, "w1", &args).unwrap();
    wait_for(LONG, "the worker to register", || {
        let out = kiln(&["workers", "--coordinator", &coord.url]);
        out.stdout.contains("w1").then_some(())
    });
    let batch = d.join("b.toml");
    sweep_file(&batch, "simtoy", prompts, seeds, 2).unwrap();
    let out = kiln(&["submit", arg(&batch), "--json", "--coordinator", &coord.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(&coord.url, &job);
    assert_exactly_once(&coord.url, &job, &d.join("out"), prompts * seeds);
    (w, job)
}

#[test]
fn completions_carry_the_next_lease_and_every_task_runs_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let http = format!("127.0.0.1:{}", free_port());
    let coord = Coordinator::start(d, &["--http", &http]).unwrap();
    let _w = run_job(d, &coord, "0ms", &["--slots", "1"], (6, 5));
    let metrics = http_get(&http, "/metrics", None).unwrap().body;
    let completes = calls(&metrics, "Complete", "OK");
    let leases = calls(&metrics, "Lease", "OK");
    assert_eq!(completes, 30.0, "one Complete per task:\n{metrics}");
    // The worker leased its first task with Lease, and calls it again only
    // when a Complete found nothing queued (at the end, waiting for more):
    // one call per task, not two.
    assert!(
        leases <= 3.0,
        "{leases} Lease calls for 30 tasks: the completions did not carry the next lease\n{metrics}"
    );
}

/// Runs a job of 6 tasks of 200 ms on one sim worker started with `flags`;
/// returns each attempt's lease and end (store clock, ms), in lease order.
fn leases_and_ends(flags: &[&str]) -> Vec<(i64, i64)> {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let coord = Coordinator::start(d, &[]).unwrap();
    let (mut w, job) = run_job(d, &coord, "100ms", flags, (3, 2));
    w.kill();
    let mut attempts: Vec<(i64, i64)> = get_job(&coord.url, &job)
        .tasks
        .iter()
        .flat_map(|t| t.attempts.iter().map(|a| (a.started_at_ms, a.ended_at_ms)))
        .collect();
    attempts.sort();
    attempts
}

#[test]
fn a_prefetching_worker_holds_its_next_task_while_it_renders() {
    // With --prefetch 1 each task after the first is leased before the
    // one rendering ahead of it ends: with the completion of the task before
    // that one, so the report and the next lease happen while the worker
    // renders. (That it renders them one at a time, not as a batch of two,
    // is `render_thread`'s `batches_never_exceed_the_limit`.)
    let prefetched = leases_and_ends(&["--prefetch", "1"]);
    assert_eq!(prefetched.len(), 6, "{prefetched:?}");
    for pair in prefetched.windows(2) {
        let ((_, ended), (leased, _)) = (pair[0], pair[1]);
        assert!(
            leased < ended,
            "each task is leased before the one ahead of it ends: {prefetched:?}"
        );
    }
    // With --prefetch 0 each lease comes with the completion before it.
    let on_demand = leases_and_ends(&["--prefetch", "0"]);
    assert_eq!(on_demand.len(), 6, "{on_demand:?}");
    for pair in on_demand.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "leased only once the task before ended: {on_demand:?}"
        );
    }
}
