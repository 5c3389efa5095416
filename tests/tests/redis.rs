//! Issue #4, durable leases on Redis: stateless coordinators, fencing, and
//! nothing lost through crashes of workers, coordinators and Redis itself.
//! Every test starts its own redis-server (AOF on) and real processes.

use std::path::Path;
use std::time::Duration;

use kiln_proto::pb::{self, TaskState};
use kiln_tests::redis::RedisServer;
use kiln_tests::*;

/// Coordinator flags for a farm on `redis`, with short leases so crashes heal quickly.
fn on_redis(redis: &RedisServer) -> Vec<String> {
    vec![
        "--store".into(),
        redis.url(),
        "--lease-ttl".into(),
        "3s".into(),
        "--heartbeat-interval".into(),
        "500ms".into(),
    ]
}

fn start(dir: &Path, name: &str, port: u16, flags: &[String]) -> Coordinator {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Coordinator::start_on(dir, name, port, &flags).expect("coordinator")
}

fn sim(dir: &Path, url: &str, id: &str, step: &str) -> Proc {
    worker(
        dir,
        url,
        id,
        &["--model", "tiny", "--renderer", "sim", "--sim-step", step],
    )
    .expect("worker")
}

fn submit(dir: &Path, url: &str, prompts: usize, seeds: usize, steps: u32) -> String {
    let batch = dir.join(format!("batch-{prompts}x{seeds}.toml"));
    sweep_file(&batch, "tiny", prompts, seeds, steps).unwrap();
    let out = kiln(&["submit", arg(&batch), "--json", "--coordinator", url]);
    assert_eq!(out.code, 0, "submit: {}", out.stderr);
    job_id(&out.stdout).unwrap()
}

fn counts(url: &str, job: &str) -> pb::TaskCounts {
    get_job(url, job)
        .job
        .and_then(|j| j.counts)
        .unwrap_or_default()
}

#[test]
fn two_coordinators_share_one_redis_and_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let redis = RedisServer::start().unwrap();
    let flags = on_redis(&redis);
    let a = start(d, "coord-a", 0, &flags);
    let b = start(d, "coord-b", 0, &flags);
    let _w1 = sim(d, &a.url, "w1", "20ms");
    let _w2 = sim(d, &b.url, "w2", "20ms");
    wait_for_workers(&a.url, 2);
    let job = submit(d, &a.url, 10, 5, 5);
    watch_ok(&b.url, &job);
    let (ea, eb) = (events(&a.url, &job), events(&b.url, &job));
    assert!(!ea.is_empty());
    assert_eq!(ea, eb, "both replicas serve the same event log");
    let completed = ea
        .iter()
        .filter(|e| e.kind == pb::EventKind::Completed as i32)
        .count();
    assert_eq!(completed, 50);
    let by_worker = |w: &str| {
        ea.iter()
            .filter(|e| e.kind == pb::EventKind::Completed as i32 && e.worker_id == w)
            .count()
    };
    assert!(
        by_worker("w1") > 0 && by_worker("w2") > 0,
        "both workers (one per coordinator) rendered"
    );
    assert_exactly_once(&b.url, &job, &d.join("out"), 50);
}

#[test]
fn sigkilled_coordinator_restarts_and_the_batch_completes_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let redis = RedisServer::start().unwrap();
    let flags = on_redis(&redis);
    let mut a = start(d, "coord", 0, &flags);
    let port = a.port();
    let _w1 = sim(d, &a.url, "w1", "50ms");
    let _w2 = sim(d, &a.url, "w2", "50ms");
    wait_for_workers(&a.url, 2);
    let job = submit(d, &a.url, 10, 4, 4);
    wait_for(Duration::from_secs(30), "some progress", || {
        (counts(&a.url, &job).completed >= 5).then_some(())
    });
    a.proc.kill();
    let restarted = start(d, "coord", port, &flags);
    watch_ok(&restarted.url, &job);
    assert_exactly_once(&restarted.url, &job, &d.join("out"), 40);
}

#[test]
fn redis_restart_with_aof_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut redis = RedisServer::start().unwrap();
    let flags = on_redis(&redis);
    let c = start(d, "coord", 0, &flags);
    let _w1 = sim(d, &c.url, "w1", "50ms");
    let _w2 = sim(d, &c.url, "w2", "50ms");
    wait_for_workers(&c.url, 2);
    let job = submit(d, &c.url, 10, 4, 4);
    wait_for(Duration::from_secs(30), "some progress", || {
        (counts(&c.url, &job).completed >= 5).then_some(())
    });
    redis.restart().unwrap();
    watch_ok(&c.url, &job);
    assert_exactly_once(&c.url, &job, &d.join("out"), 40);
}

#[test]
fn five_seconds_without_redis_are_ridden_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let redis = RedisServer::start().unwrap();
    let flags = on_redis(&redis);
    let c = start(d, "coord", 0, &flags);
    let _w1 = sim(d, &c.url, "w1", "50ms");
    let _w2 = sim(d, &c.url, "w2", "50ms");
    wait_for_workers(&c.url, 2);
    let job = submit(d, &c.url, 10, 4, 4);
    wait_for(Duration::from_secs(30), "some progress", || {
        (counts(&c.url, &job).completed >= 5).then_some(())
    });
    redis.signal("STOP");
    std::thread::sleep(Duration::from_secs(5));
    redis.signal("CONT");
    watch_ok(&c.url, &job);
    assert_exactly_once(&c.url, &job, &d.join("out"), 40);
}

#[test]
fn stalled_worker_is_fenced_on_redis() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let redis = RedisServer::start().unwrap();
    let flags = vec![
        "--store".into(),
        redis.url(),
        "--lease-ttl".into(),
        "2s".into(),
        "--heartbeat-interval".into(),
        "300ms".into(),
    ];
    let c = start(d, "coord", 0, &flags);
    let stalled = sim(d, &c.url, "stalled", "300ms");
    wait_for_workers(&c.url, 1);
    let job = submit(d, &c.url, 1, 1, 10);
    wait_for(Duration::from_secs(30), "the lease", || {
        (get_job(&c.url, &job).tasks[0].state == TaskState::Leased as i32).then_some(())
    });
    stalled.signal("STOP");
    wait_for(Duration::from_secs(30), "the lease to be reaped", || {
        get_job(&c.url, &job).tasks[0]
            .attempts
            .first()
            .filter(|a| a.outcome == "expired")
            .map(|_| ())
    });
    let _fresh = sim(d, &c.url, "fresh", "0ms");
    watch_ok(&c.url, &job);
    stalled.signal("CONT");
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
    let evs = events(&c.url, &job);
    assert!(
        !evs.iter()
            .any(|e| e.kind == pb::EventKind::Completed as i32 && e.worker_id == "stalled")
    );
    assert_exactly_once(&c.url, &job, &d.join("out"), 1);
    let lines = manifest(&d.join("out")).unwrap();
    assert_eq!(lines[0]["worker"], "fresh");
    assert_eq!(
        pngs(&c.results.join(&job)).len(),
        1,
        "its image never appears"
    );
}

#[test]
fn twenty_worker_sigkills_in_a_200_item_batch_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let redis = RedisServer::start().unwrap();
    let c = start(d, "coord", 0, &on_redis(&redis));
    let mut workers: Vec<Proc> = (0..4)
        .map(|i| sim(d, &c.url, &format!("w{i}"), "40ms"))
        .collect();
    wait_for_workers(&c.url, 4);
    let job = submit(d, &c.url, 20, 10, 5);
    // A fixed-seed LCG picks the victims: random, and the same on every run.
    let mut rng: u64 = 0x5eed;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) as usize
    };
    for kill in 0..20 {
        std::thread::sleep(Duration::from_millis(150 + (next() % 200) as u64));
        let victim = next() % workers.len();
        workers[victim].kill();
        workers[victim] = sim(d, &c.url, &format!("r{kill}"), "40ms");
    }
    watch_ok(&c.url, &job);
    assert_exactly_once(&c.url, &job, &d.join("out"), 200);
    let tasks = get_job(&c.url, &job).tasks;
    let expired: usize = tasks
        .iter()
        .map(|t| t.attempts.iter().filter(|a| a.outcome == "expired").count())
        .sum();
    assert!(expired > 0, "the kills took leases with them");
    let evs = events(&c.url, &job);
    for i in 0..200u32 {
        let n = evs
            .iter()
            .filter(|e| e.kind == pb::EventKind::Completed as i32 && e.index == i)
            .count();
        assert_eq!(n, 1, "item {i} completed {n} times");
    }
    assert_eq!(pngs(&c.results.join(&job)).len(), 200);
}
