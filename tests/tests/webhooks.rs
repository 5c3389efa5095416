//! Webhooks (#11): a receiver on loopback records every POST; the
//! coordinator signs each body, retries after a 5xx, and refuses private
//! targets unless `--webhook-allow-private` is given.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_tests::*;
use sha2::{Digest, Sha256};

/// One POST as the receiver saw it.
#[derive(Clone, Debug)]
struct Hook {
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    /// Whether the manifest the body names existed when the POST arrived.
    manifest_existed: bool,
    /// The status the receiver answered.
    answered: u16,
}

/// A tiny HTTP/1.1 server: records every request; a path starting with
/// `/flaky` answers 500 to its first request and 200 after, others 200.
struct Receiver {
    port: u16,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

impl Receiver {
    fn start() -> Self {
        Self::start_on(0)
    }

    /// Starts the receiver on `port` (0: any free one).
    fn start_on(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hooks: Arc<Mutex<Vec<Hook>>> = Arc::default();
        let seen = hooks.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                let mut headers = BTreeMap::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let manifest_existed = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["manifest"].as_str().map(|m| Path::new(m).exists()))
                    .unwrap_or(false);
                let mut hooks = seen.lock().unwrap();
                let earlier = hooks.iter().filter(|h| h.path == path).count();
                let answered = if path.starts_with("/flaky") && earlier == 0 {
                    500
                } else {
                    200
                };
                hooks.push(Hook {
                    path,
                    headers,
                    body,
                    manifest_existed,
                    answered,
                });
                drop(hooks);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {answered} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Self { port, hooks }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }
}

/// HMAC-SHA256 (RFC 2104) over sha2, written out so the test checks the
/// signature with code of its own.
fn hmac_sha256(key: &[u8], message: &[u8]) -> String {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    hex::encode(outer)
}

const SECRET: &str = "hook-secret-1234";

/// Writes a four-task batch file for the sim workers, with `notify` lines.
fn batch(dir: &Path, notify: &[String]) -> std::path::PathBuf {
    let path = dir.join("hooked.toml");
    sweep_file(&path, "simtoy", 2, 2, 2).unwrap();
    let list: Vec<String> = notify.iter().map(|u| format!("{u:?}")).collect();
    let text = format!(
        "notify = [{}]\n{}",
        list.join(", "),
        std::fs::read_to_string(&path).unwrap()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_signed_webhook_arrives_when_a_job_ends_and_a_500_is_retried() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret_file = d.join("hook.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let farm_hook = receiver.url("/hook");
    let c = Coordinator::start(
        d,
        &[
            "--webhook",
            &farm_hook,
            "--webhook-secret-file",
            arg(&secret_file),
            "--webhook-allow-private",
        ],
    )
    .unwrap();
    let _w = sim_worker(d, &c.url, "w1", &[], &[]).unwrap();
    wait_for_workers(&c.url, 1);
    let file = batch(d, &[receiver.url("/flaky/batch")]);
    let out = kiln(&["submit", arg(&file), "--json", "--coordinator", &c.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(&c.url, &job);

    // The farm's target once; the batch's target twice: a 500, then a 200.
    let hooks = wait_for(Duration::from_secs(60), "both webhooks delivered", || {
        let hooks = receiver.hooks();
        let delivered = |p: &str| hooks.iter().any(|h| h.path == p && h.answered == 200);
        (delivered("/hook") && delivered("/flaky/batch")).then_some(hooks)
    });
    let flaky: Vec<&Hook> = hooks.iter().filter(|h| h.path == "/flaky/batch").collect();
    assert_eq!(
        flaky.iter().map(|h| h.answered).collect::<Vec<_>>(),
        [500, 200],
        "retried after the 500, and only until the 200"
    );
    for h in &hooks {
        assert_eq!(h.headers["content-type"], "application/json");
        let want = format!("sha256={}", hmac_sha256(SECRET.as_bytes(), &h.body));
        assert_eq!(h.headers["x-kiln-signature"], want, "{}", h.path);
        let body: serde_json::Value = serde_json::from_slice(&h.body).unwrap();
        assert_eq!(body["job_id"], job.as_str());
        assert_eq!(body["name"], "hooked");
        assert_eq!(body["project"], "default");
        assert_eq!(body["state"], "completed");
        assert_eq!(body["counts"]["total"], 4);
        assert_eq!(body["counts"]["completed"], 4);
        let manifest = body["manifest"].as_str().unwrap();
        assert!(
            manifest.ends_with(&format!("{job}/manifest.jsonl")),
            "{manifest}"
        );
        assert!(
            h.manifest_existed,
            "the manifest is written before the POST"
        );
    }
    // Same body to every target, so one signature check covers them.
    assert!(hooks.windows(2).all(|w| w[0].body == w[1].body));
    let log = c.proc.output();
    assert!(log.contains("webhook delivered"), "{log}");
    assert!(!log.contains(SECRET), "the secret is in the log");
}

#[test]
fn private_targets_are_refused_without_the_flag() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hook = receiver.url("/hook");
    let c = Coordinator::start(d, &["--webhook", &hook]).unwrap();
    let _w = sim_worker(d, &c.url, "w1", &[], &[]).unwrap();
    wait_for_workers(&c.url, 1);
    // A batch file may name one too; it is refused the same way.
    let file = batch(d, &["http://localhost:9/probe".to_string()]);
    let out = kiln(&["submit", arg(&file), "--json", "--coordinator", &c.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(&c.url, &job);
    let refusals = wait_for(Duration::from_secs(60), "both targets refused", || {
        let log = c.proc.output();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("webhook target refused"))
            .map(str::to_string)
            .collect();
        (lines.len() >= 2).then_some(lines)
    });
    assert!(
        refusals
            .iter()
            .any(|l| l.contains("127.0.0.1") && l.contains("--webhook-allow-private")),
        "{refusals:?}"
    );
    assert!(
        refusals.iter().any(|l| l.contains("localhost")),
        "{refusals:?}"
    );
    assert_eq!(receiver.hooks().len(), 0, "nothing reached the receiver");
}

#[test]
fn bad_webhook_urls_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let c = Coordinator::start(d, &["--webhook", "ftp://studio.example/x"]);
    let Err(e) = c else {
        panic!("a coordinator started with an ftp:// webhook");
    };
    assert!(
        format!("{e:#}").contains("--webhook: must be an http:// or https:// URL"),
        "{e:#}"
    );
    let c = Coordinator::start(d, &[]).unwrap();
    let file = batch(d, &["gopher://studio.example/".to_string()]);
    let out = kiln(&["submit", arg(&file), "--coordinator", &c.url]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("hooked.toml:1: notify[0]: must be an http:// or https:// URL"),
        "{}",
        out.stderr
    );
}

/// The delivery lives in the store: a coordinator on Redis sees the job end
/// while the receiver is down and dies; another coordinator, started only
/// afterwards on the same Redis, delivers it.
#[test]
fn a_webhook_survives_the_coordinator_that_saw_the_job_end() {
    let redis = kiln_tests::redis::RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A port with nobody listening yet: every POST is refused until the
    // receiver starts on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hook = format!("http://127.0.0.1:{port}/hook");
    let url = redis.url();
    let flags = [
        "--store",
        url.as_str(),
        "--webhook",
        hook.as_str(),
        "--webhook-allow-private",
    ];
    let mut first = Coordinator::start_on(d, "first", 0, &flags).unwrap();
    let w = sim_worker(d, &first.url, "w1", &[], &[]).unwrap();
    wait_for_workers(&first.url, 1);
    let file = batch(d, &[]);
    let out = kiln(&["submit", arg(&file), "--json", "--coordinator", &first.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(&first.url, &job);
    wait_for(Duration::from_secs(60), "a failed delivery attempt", || {
        first
            .proc
            .output()
            .contains("webhook not delivered; retrying")
            .then_some(())
    });
    first.proc.kill();
    drop(w);
    let receiver = Receiver::start_on(port);
    let second = Coordinator::start_on(d, "second", 0, &flags).unwrap();
    let hooks = wait_for(
        Duration::from_secs(120),
        "the delivery by the second coordinator",
        || {
            let hooks = receiver.hooks();
            (!hooks.is_empty()).then_some(hooks)
        },
    );
    let body: serde_json::Value = serde_json::from_slice(&hooks[0].body).unwrap();
    assert_eq!(body["job_id"], job.as_str());
    assert_eq!(body["state"], "completed");
    assert!(
        second.proc.output().contains("webhook delivered"),
        "{}",
        second.proc.output()
    );
}
