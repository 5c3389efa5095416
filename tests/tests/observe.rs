//! The HTTP side door between real processes (#11): `/healthz`, `/readyz`,
//! `/metrics` and `/api/v1/queue` on the coordinator's gRPC port and on
//! `--http`, the worker's `--http` with its gRPC health service, tokens on
//! the HTTP side, metrics counting a finished job, `promtool check metrics`
//! on live output, and a real Prometheus server scraping a coordinator.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_tests::{
    Coordinator, HttpAnswer, Proc, arg, block, free_port, http_get, job_id, kiln, metric_sum,
    sim_worker, sweep_file, tiny_model, wait_for, watch_ok, worker,
};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const LONG: Duration = Duration::from_secs(120);

/// `host:port` of a coordinator's gRPC port.
fn grpc_addr(coord: &Coordinator) -> String {
    format!("127.0.0.1:{}", coord.port())
}

fn get(addr: &str, path: &str) -> HttpAnswer {
    http_get(addr, path, None).unwrap_or_else(|e| panic!("GET {addr}{path}: {e:#}"))
}

fn json(answer: &HttpAnswer) -> serde_json::Value {
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {}", answer.body))
}

/// Runs `promtool check metrics` on `text`: `None` when promtool is not
/// installed, else its exit code and output.
fn promtool(text: &str) -> Option<(i32, String)> {
    use std::io::Write;
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.code().unwrap_or(-1), text))
}

/// Asserts that promtool accepts `text` without a word; says so and
/// passes when promtool is absent (CI installs it: `.ci/run`).
fn assert_promtool_clean(who: &str, text: &str) {
    match promtool(text) {
        None => eprintln!(
            "SKIPPED promtool check of {who}: promtool is not installed (apt-get install prometheus)"
        ),
        Some((code, out)) => {
            assert_eq!(code, 0, "promtool rejects {who}'s /metrics: {out}\n{text}");
            assert!(out.trim().is_empty(), "promtool warns on {who}: {out}");
        }
    }
}

fn health(addr: &str) -> ServingStatus {
    block(async {
        let channel =
            kiln_proto::connect::channel("url", &format!("http://{addr}"), &Default::default())
                .expect("channel");
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check");
        ServingStatus::try_from(answer.into_inner().status).expect("a known status")
    })
}

#[test]
fn one_port_serves_http_beside_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(tmp.path(), &[]).unwrap();
    let at = grpc_addr(&coord);

    let h = get(&at, "/healthz");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let r = get(&at, "/readyz");
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    assert_eq!(get(&at, "/no-such-page").status, 404);
    let q = json(&get(&at, "/api/v1/queue"));
    assert_eq!(
        q,
        serde_json::json!({"models": {}, "queued": 0, "running": 0})
    );
    let m = get(&at, "/metrics");
    assert_eq!(m.status, 200);
    assert_eq!(metric_sum(&m.body, "kiln_jobs"), Some(0.0), "{}", m.body);
    assert_eq!(metric_sum(&m.body, "kiln_workers"), Some(0.0));

    // gRPC on the same port, timed by the RPC layer.
    let out = kiln(&["workers", "--coordinator", &coord.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let m = get(&at, "/metrics");
    assert!(
        m.body
            .contains("kiln_rpc_seconds_count{method=\"/kiln.v1.Farm/ListWorkers\",code=\"OK\"} 1"),
        "{}",
        m.body
    );
    assert_promtool_clean("the coordinator", &m.body);
}

#[test]
fn the_queue_api_counts_queued_running_and_workers_per_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let coord = Coordinator::start(d, &[]).unwrap();
    let at = grpc_addr(&coord);
    // One slot and one prefetch place, and steps slow enough that the first
    // task is still rendering when the counts are read: the prefetched task
    // is leased, so it counts as running too.
    let _w = worker(
        d,
        &coord.url,
        "sim-1",
        &[
            "--renderer",
            "sim",
            "--model",
            "simtoy",
            "--sim-step",
            "30s",
            "--slots",
            "1",
            "--prefetch",
            "1",
        ],
    )
    .unwrap();
    wait_for(LONG, "the worker to register", || {
        let q = json(&get(&at, "/api/v1/queue"));
        (q["models"]["simtoy"]["workers"] == 1).then_some(())
    });
    let batch = d.join("b.toml");
    sweep_file(&batch, "simtoy", 1, 4, 3).unwrap();
    let out = kiln(&["submit", arg(&batch), "--coordinator", &coord.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let q = wait_for(LONG, "two tasks running", || {
        let q = json(&get(&at, "/api/v1/queue"));
        (q["running"] == 2).then_some(q)
    });
    assert_eq!(
        q,
        serde_json::json!({
            "models": {"simtoy": {"queued": 2, "running": 2, "workers": 1}},
            "queued": 2,
            "running": 2
        })
    );
    let one = json(&get(&at, "/api/v1/queue?model=simtoy"));
    assert_eq!(one, q, "the only model is the whole queue");
    let other = json(&get(&at, "/api/v1/queue?model=sd15"));
    assert_eq!(
        other,
        serde_json::json!({
            "models": {"sd15": {"queued": 0, "running": 0, "workers": 0}},
            "queued": 0,
            "running": 0
        })
    );
    let bad = get(&at, "/api/v1/queue?model=no%20spaces");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.starts_with("model"), "{}", bad.body);
    assert_eq!(bad.body.lines().count(), 1, "{}", bad.body);

    // The same numbers as gauges.
    let m = get(&at, "/metrics").body;
    assert!(
        m.contains("kiln_tasks{state=\"queued\",model=\"simtoy\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("kiln_tasks{state=\"running\",model=\"simtoy\"} 2"),
        "{m}"
    );
    assert!(m.contains("kiln_workers{state=\"busy\"} 1"), "{m}");
    assert!(m.contains("kiln_jobs{state=\"running\"} 1"), "{m}");
}

/// Starts a Prometheus server scraping `target` every second; `None` when
/// prometheus is not installed.
fn prometheus(dir: &Path, target: &str) -> Option<(Proc, String)> {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        return None;
    }
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: kiln\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let data = dir.join("tsdb");
    let proc = Proc::spawn_exe(
        "prometheus",
        &[
            &format!("--config.file={}", arg(&config)),
            &format!("--storage.tsdb.path={}", arg(&data)),
            &format!("--web.listen-address={web}"),
        ],
        &dir.join("prometheus.log"),
    )
    .unwrap();
    Some((proc, web))
}

#[test]
fn metrics_count_a_finished_job_and_prometheus_scrapes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let http = format!("127.0.0.1:{}", free_port());
    let coord = Coordinator::start(d, &["--http", &http]).unwrap();
    let worker_http = format!("127.0.0.1:{}", free_port());
    let model = format!("tiny={}", arg(&tiny_model()));
    let _w = worker(
        d,
        &coord.url,
        "w1",
        &["--model", &model, "--http", &worker_http],
    )
    .unwrap();
    wait_for(LONG, "the worker to be ready", || {
        let r = http_get(&worker_http, "/readyz", None).ok()?;
        (r.status == 200).then_some(())
    });
    assert_eq!(get(&worker_http, "/healthz").status, 200);
    assert_eq!(health(&worker_http), ServingStatus::Serving);
    // With --http the gRPC port serves gRPC only.
    assert!(
        http_get(&grpc_addr(&coord), "/healthz", None).map_or(true, |a| a.status != 200),
        "the gRPC port answered plain HTTP although --http was given"
    );

    let batch = d.join("b.toml");
    sweep_file(&batch, "tiny", 2, 2, 2).unwrap();
    let out = kiln(&["submit", arg(&batch), "--json", "--coordinator", &coord.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(&coord.url, &job);

    let c = get(&http, "/metrics").body;
    assert_eq!(
        metric_sum(&c, "kiln_task_completions_total"),
        Some(4.0),
        "{c}"
    );
    assert!(
        c.contains("kiln_task_completions_total{model=\"tiny\",outcome=\"completed\"} 4"),
        "{c}"
    );
    assert_eq!(metric_sum(&c, "kiln_task_attempts_total"), Some(4.0), "{c}");
    assert_eq!(metric_sum(&c, "kiln_queue_wait_seconds_count"), Some(4.0));
    assert_eq!(metric_sum(&c, "kiln_task_seconds_count"), Some(4.0));
    assert!(c.contains("kiln_jobs{state=\"completed\"} 1"), "{c}");
    assert_eq!(metric_sum(&c, "kiln_stale_completions_total"), Some(0.0));
    assert_eq!(metric_sum(&c, "kiln_store_errors_total"), Some(0.0));
    let w = get(&worker_http, "/metrics").body;
    assert!(w.contains("kiln_renders_total{outcome=\"ok\"} 4"), "{w}");
    assert_eq!(
        metric_sum(&w, "kiln_render_seconds_count"),
        Some(4.0),
        "{w}"
    );
    assert!(
        w.contains("kiln_model_loads_total{model=\"tiny\"} 1"),
        "{w}"
    );
    assert!(
        metric_sum(&w, "kiln_models_resident_bytes").is_some_and(|b| b > 0.0),
        "{w}"
    );
    // A CPU worker has no device memory to export.
    assert!(!w.contains("kiln_device_memory_bytes"), "{w}");
    // Two steps per batch: one interval between them per batch.
    assert!(
        metric_sum(&w, "kiln_step_seconds_count").is_some_and(|n| n >= 1.0),
        "{w}"
    );
    assert_promtool_clean("the coordinator", &c);
    assert_promtool_clean("the worker", &w);
    let q = json(&get(&http, "/api/v1/queue"));
    assert_eq!(q["models"]["tiny"]["workers"], 1, "{q}");

    let Some((_prom, web)) = prometheus(d, &http) else {
        eprintln!(
            "SKIPPED the Prometheus scrape: prometheus is not installed (apt-get install prometheus)"
        );
        return;
    };
    let path = "/api/v1/query?query=sum(kiln_task_completions_total)";
    let value = wait_for(LONG, "Prometheus to scrape the coordinator", || {
        let a = http_get(&web, path, None).ok()?;
        let v: serde_json::Value = serde_json::from_str(&a.body).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_string)
    });
    assert_eq!(value, "4", "Prometheus' sum of kiln_task_completions_total");
}

#[test]
fn a_worker_is_alive_but_not_ready_until_it_registers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Nothing listens on the coordinator's address yet.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let worker_http = format!("127.0.0.1:{}", free_port());
    let _w = sim_worker(d, &url, "early", &["--http", &worker_http], &[]).unwrap();
    let r = wait_for(LONG, "the worker's side door", || {
        http_get(&worker_http, "/readyz", None).ok()
    });
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.starts_with("not ready: "), "{}", r.body);
    assert_eq!(r.body.lines().count(), 1, "one line: {}", r.body);
    assert_eq!(get(&worker_http, "/healthz").status, 200);
    assert_eq!(health(&worker_http), ServingStatus::NotServing);
    assert_promtool_clean("a fresh worker", &get(&worker_http, "/metrics").body);

    // The coordinator comes up on that port: the worker registers and is ready.
    let _coord = Coordinator::start_on(d, "coordinator", port, &[]).unwrap();
    wait_for(LONG, "the worker to become ready", || {
        (get(&worker_http, "/readyz").status == 200).then_some(())
    });
    assert_eq!(health(&worker_http), ServingStatus::Serving);
}

#[test]
fn with_auth_metrics_and_queue_need_a_token_and_probes_stay_open() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = kiln(&[
        "token",
        "new",
        "--name",
        "scraper",
        "--role",
        "viewer",
        "--project",
        "a",
        "--json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let auth = d.join("auth.toml");
    std::fs::write(&auth, v["block"].as_str().unwrap()).unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let coord = Coordinator::start(d, &["--auth", arg(&auth)]).unwrap();
    let separate = Coordinator::start_on(
        d,
        "coordinator-http",
        0,
        &["--auth", arg(&auth), "--http", &http],
    )
    .unwrap();

    for at in [grpc_addr(&coord), http] {
        for path in ["/metrics", "/api/v1/queue"] {
            let none = http_get(&at, path, None).unwrap();
            assert_eq!(
                none.status, 401,
                "{at}{path} without a token: {}",
                none.body
            );
            assert!(none.body.contains("no token"), "{}", none.body);
            let wrong = http_get(&at, path, Some("kiln_not-a-token")).unwrap();
            assert_eq!(wrong.status, 401, "{at}{path} with a wrong token");
            assert!(wrong.body.contains("unknown token"), "{}", wrong.body);
            let good = http_get(&at, path, Some(&token)).unwrap();
            assert_eq!(good.status, 200, "{at}{path} with a token: {}", good.body);
        }
        for path in ["/healthz", "/readyz"] {
            assert_eq!(get(&at, path).status, 200, "{at}{path} stays open");
        }
    }
    drop(separate);
    // The refusals never echo the token.
    let log = coord.proc.output();
    assert!(!log.contains(&token), "a token in the log");
}
