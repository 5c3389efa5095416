//! Live previews between real processes (#16): a slow sim job's previews
//! reach `kiln watch --previews DIR` and the coordinator's
//! `GET /api/v1/jobs/{job}/previews/{index}` while it runs, and are gone when
//! it ends; tokens of no or another project are refused; two coordinators
//! on one Redis serve the same preview.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use kiln_tests::redis::RedisServer;
use kiln_tests::{Coordinator, Proc, arg, job_id, kiln, kiln_env, sweep_file, wait_for};

const LONG: Duration = Duration::from_secs(90);

/// A token made by `kiln token new`: the secret and its auth-file block.
struct Token {
    token: String,
    block: String,
}

fn new_token(name: &str, role: &str, projects: &[&str]) -> Token {
    let mut args = vec!["token", "new", "--name", name, "--role", role, "--json"];
    for p in projects {
        args.extend_from_slice(&["--project", p]);
    }
    let out = kiln(&args);
    assert_eq!(out.code, 0, "token new: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    Token {
        token: v["token"].as_str().unwrap().to_string(),
        block: v["block"].as_str().unwrap().to_string(),
    }
}

/// An HTTP answer with its raw body.
struct Answer {
    status: u16,
    /// The status line and headers, lower-cased.
    head: String,
    body: Vec<u8>,
}

/// `GET path` over HTTP/1.1 with an optional bearer token; 10 s timeouts.
fn get(addr: &str, path: &str, token: Option<&str>) -> Answer {
    let socket: std::net::SocketAddr = addr.parse().unwrap();
    let mut stream =
        std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(10)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        !head.contains("transfer-encoding: chunked"),
        "a preview has a length: {head}"
    );
    Answer {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

/// Returns (width, height) of PNG bytes.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a decodable PNG");
    (img.width(), img.height())
}

/// A one-image sim job of `steps` steps (64 × 64) in `project`.
fn slow_job(dir: &Path, project: &str, steps: u32) -> std::path::PathBuf {
    let path = dir.join("slow.toml");
    sweep_file(&path, "simtoy", 1, 1, steps).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("project = \"{project}\"\n{text}")).unwrap();
    path
}

/// Starts a sim worker taking 300 ms a step, with a preview every `every` steps.
fn slow_sim(dir: &Path, url: &str, every: &str, env: &[(&str, &str)]) -> Proc {
    let args = [
        "--coordinator",
        url,
        "--id",
        "w1",
        "--renderer",
        "sim",
        "--model",
        "simtoy",
        "--sim-step",
        "300ms",
        "--preview-every",
        every,
    ];
    Proc::spawn_env("kiln-worker", &args, env, &dir.join("w1.log")).unwrap()
}

/// Submits `batch` once the sim worker has announced its model; returns the job id.
fn submit_once_registered(url: &str, batch: &Path, env: &[(&str, &str)]) -> String {
    wait_for(
        LONG,
        "the worker to register and the job to be accepted",
        || {
            let out = kiln_env(&["submit", arg(batch), "--json", "--coordinator", url], env);
            if out.code != 0 {
                assert!(
                    out.stderr.contains("no worker has announced it"),
                    "submit: {}",
                    out.stderr
                );
                return None;
            }
            Some(job_id(&out.stdout).unwrap())
        },
    )
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

#[test]
fn a_slow_sim_job_shows_live_previews_in_watch_and_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let studio = new_token("studio", "submitter", &["a"]);
    let other = new_token("outsider", "viewer", &["b"]);
    let nodes = new_token("render-nodes", "worker", &[]);
    let auth = d.join("auth.toml");
    std::fs::write(
        &auth,
        [&studio.block, &other.block, &nodes.block]
            .map(String::as_str)
            .join("\n"),
    )
    .unwrap();
    let c =
        Coordinator::start(d, &["--auth", arg(&auth), "--heartbeat-interval", "300ms"]).unwrap();
    let _w = slow_sim(d, &c.url, "5", &[("KILN_TOKEN", &nodes.token)]);
    let batch = slow_job(d, "a", 30);
    let job = submit_once_registered(&c.url, &batch, &[("KILN_TOKEN", &studio.token)]);
    let previews = d.join("previews");
    let mut watch = Proc::spawn_env(
        "kiln",
        &[
            "watch",
            &job,
            "--previews",
            arg(&previews),
            "--coordinator",
            &c.url,
        ],
        &[("KILN_TOKEN", &studio.token)],
        &d.join("watch.log"),
    )
    .unwrap();

    // While the task runs, the endpoint serves its latest preview.
    let addr = host_port(&c.url);
    let path = format!("/api/v1/jobs/{job}/previews/0");
    let live = wait_for(LONG, "a live preview over HTTP", || {
        let a = get(&addr, &path, Some(&studio.token));
        (a.status == 200).then_some(a)
    });
    assert!(
        live.head.contains("content-type: image/png"),
        "{}",
        live.head
    );
    assert!(
        live.head.contains("cache-control: no-store"),
        "{}",
        live.head
    );
    assert_eq!(png_size(&live.body), (64, 64));

    // No token: 401; a token of another project: 403; no such item: 404.
    assert_eq!(get(&addr, &path, None).status, 401);
    let outsider = get(&addr, &path, Some(&other.token));
    assert_eq!(
        outsider.status,
        403,
        "{}",
        String::from_utf8_lossy(&outsider.body)
    );
    assert!(!png_size_ok(&outsider.body), "no picture for an outsider");
    let missing = format!("/api/v1/jobs/{job}/previews/7");
    assert_eq!(get(&addr, &missing, Some(&studio.token)).status, 404);

    // The watcher writes the latest preview per task while the job runs.
    let file = previews.join("00000.png");
    wait_for(LONG, "kiln watch to write a preview", || {
        file.exists().then_some(())
    });
    let written = kiln_tests::decode_png(&file).unwrap();
    assert_eq!((written.width, written.height), (64, 64));
    assert_eq!(watch.wait_exit(LONG), Some(0), "{}", watch.output());

    // The job is over: its preview is gone.
    let after = get(&addr, &path, Some(&studio.token));
    assert_eq!(
        after.status,
        404,
        "{}",
        String::from_utf8_lossy(&after.body)
    );
}

fn png_size_ok(bytes: &[u8]) -> bool {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png).is_ok()
}

#[test]
fn two_coordinators_on_one_redis_serve_the_same_preview() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let redis = RedisServer::start().unwrap();
    let flags = ["--store", &redis.url(), "--heartbeat-interval", "300ms"];
    let a = Coordinator::start_on(d, "coordinator-a", 0, &flags).unwrap();
    let b = Coordinator::start_on(d, "coordinator-b", 0, &flags).unwrap();
    let _w = slow_sim(d, &a.url, "2", &[]);
    let batch = slow_job(d, "default", 40);
    let job = submit_once_registered(&a.url, &batch, &[]);
    let path = format!("/api/v1/jobs/{job}/previews/0");
    // The worker reports to a; b reads the same preview from Redis.
    let seen = wait_for(LONG, "b to serve a's preview", || {
        let from_b = get(&host_port(&b.url), &path, None);
        (from_b.status == 200).then_some(from_b.body)
    });
    assert_eq!(png_size(&seen), (64, 64));
    let out = kiln(&["watch", &job, "--coordinator", &b.url]);
    assert_eq!(out.code, 0, "watch: {}", out.stderr);
    assert_eq!(get(&host_port(&a.url), &path, None).status, 404);
    assert_eq!(get(&host_port(&b.url), &path, None).status, 404);
}
