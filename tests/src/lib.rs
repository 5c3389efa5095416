//! Test harness for kiln's cross-process tests: starts the real binaries
//! (`kiln-coordinator`, `kiln-worker`, `kiln`) on loopback with their logs in a
//! temporary folder, and kills whatever is left when a test ends.
//!
//! The binaries are the ones `cargo build --workspace --bins` put beside the
//! test executable; README's test command builds them first.

pub mod otlp;
pub mod redis;
pub mod s3;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_proto::connect::{AuthChannel, Bearer};
use kiln_proto::pb::farm_client::FarmClient;

/// Returns the path of one of kiln's binaries, built beside the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` (README's test command does)",
        path.display()
    );
    path
}

/// A child process that is killed when dropped; its stderr and stdout go to a log file.
pub struct Proc {
    child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args`, logging to `log`.
    pub fn spawn(bin: &str, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        Self::spawn_env(bin, args, &[], log)
    }

    /// Starts `bin` with `args` and the environment variables `env`, logging to `log`.
    pub fn spawn_env(
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let child = Command::new(binary(bin))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// Starts a program found on the `PATH` (prometheus, say) with `args`, logging to `log`.
    pub fn spawn_exe(program: &str, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let child = Command::new(program)
            .args(args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    /// Returns the process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`kill -SIG pid`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, for at most `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Returns what it logged so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator process on a free loopback port.
pub struct Coordinator {
    /// The process.
    pub proc: Proc,
    /// Its gRPC URL.
    pub url: String,
    /// Its result directory.
    pub results: PathBuf,
}

impl Coordinator {
    /// Starts a coordinator on a free port with results under `dir/results` and extra flags.
    pub fn start(dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(dir, "coordinator", 0, extra)
    }

    /// Starts a coordinator named `name` (its log is `dir/<name>.log`) on
    /// `port` (0: any free one), with results under `dir/results`.
    pub fn start_on(dir: &Path, name: &str, port: u16, extra: &[&str]) -> anyhow::Result<Self> {
        Self::launch(dir, name, port, extra, &[], None)
    }

    /// Starts a coordinator with `extra` flags and the environment `env`; an
    /// `--results` among `extra` replaces the default result directory.
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::launch(dir, "coordinator", 0, extra, env, None)
    }

    /// Starts a coordinator that serves TLS: `extra` and `env` must give it
    /// `--tls-cert` and `--tls-key` (for a certificate valid for `localhost`);
    /// its URL is `https://localhost:PORT`.
    pub fn start_tls(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::launch(dir, "coordinator", 0, extra, env, Some("localhost"))
    }

    /// Starts a coordinator with `extra` flags and `env`; `tls_host`, when
    /// given, makes its URL `https://<tls_host>:PORT`.
    fn launch(
        dir: &Path,
        name: &str,
        port: u16,
        extra: &[&str],
        env: &[(&str, &str)],
        tls_host: Option<&str>,
    ) -> anyhow::Result<Self> {
        let results = dir.join("results");
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let results_arg = results.display().to_string();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["--listen", listen.as_str()];
        if !extra.contains(&"--results") {
            args.extend(["--results", results_arg.as_str()]);
        }
        args.extend_from_slice(extra);
        let mut child = Command::new(binary("kiln-coordinator"))
            .args(&args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(file.try_clone()?)
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start kiln-coordinator")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Copies the log to the file and reports the address it listens on.
        std::thread::spawn(move || {
            let mut file = file;
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if !sent
                    && let Some(addr) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next())
                {
                    let _ = tx.send(addr.to_string());
                    sent = true;
                }
            }
        });
        let proc = Proc { child, log };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .with_context(|| format!("the coordinator did not start: {}", proc.output()))?;
        let url = match tls_host {
            None => format!("http://{addr}"),
            Some(host) => {
                let port = addr.rsplit(':').next().unwrap_or_default();
                format!("https://{host}:{port}")
            }
        };
        Ok(Self { proc, url, results })
    }

    /// Returns the port it listens on.
    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// Returns a Farm client to it.
    pub async fn client(&self) -> FarmClient<AuthChannel> {
        kiln_proto::connect::farm_client(
            kiln_proto::connect::channel("url", &self.url, &Default::default()).expect("valid URL"),
            Bearer::none(),
        )
    }
}

/// Starts a worker process with the given id and flags, logging to `dir/<id>.log`.
pub fn worker(dir: &Path, coordinator: &str, id: &str, extra: &[&str]) -> anyhow::Result<Proc> {
    let mut args = vec!["--coordinator", coordinator, "--id", id];
    args.extend_from_slice(extra);
    Proc::spawn("kiln-worker", &args, &dir.join(format!("{id}.log")))
}

/// Starts a `kiln-worker` with the sim renderer (model `simtoy`, no step
/// delay), `extra` flags and `env` variables, logging to `<dir>/<id>.log`.
pub fn sim_worker(
    dir: &Path,
    coordinator: &str,
    id: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<Proc> {
    let mut args = vec![
        "--coordinator",
        coordinator,
        "--id",
        id,
        "--renderer",
        "sim",
        "--model",
        "simtoy",
        "--sim-step",
        "0ms",
    ];
    args.extend_from_slice(extra);
    Proc::spawn_env("kiln-worker", &args, env, &dir.join(format!("{id}.log")))
}

/// The result of running `kiln`.
pub struct Output {
    /// Exit code (-1 if killed).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `kiln` with `args` to completion.
pub fn kiln(args: &[&str]) -> Output {
    kiln_env(args, &[])
}

/// Runs `kiln` with `args` and the environment variables `env` to completion;
/// TLS and token variables of the test's own environment are not passed on.
pub fn kiln_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(binary("kiln"))
        .args(args)
        .env_remove("KILN_CA")
        .env_remove("KILN_TLS_CERT")
        .env_remove("KILN_TLS_KEY")
        .env_remove("KILN_TOKEN")
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .output()
        .expect("cannot run kiln");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The series of issue #5, word for word.
pub const MIRA: &str = r#"[series.mira]
model = "tiny"
character = "Mira, a young cartographer with a short copper bob, round glasses and a green wool coat"
negative_prompt = "extra fingers, deformed hands"
seed = 777
width = 64
height = 64
steps = 6
anchor = true
consistency = 0.6

[[series.mira.shots]]
prompt = "standing on a cliff at sunrise, wind in her coat"
[[series.mira.shots]]
prompt = "reading a map by candlelight in a library"
[[series.mira.shots]]
prompt = "running through a rainy market street"
seed = 9001
"#;

/// Returns a path as a command-line argument.
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes `text` to `dir/name`, submits it to `url`, and returns the job id.
pub fn submit_text(dir: &Path, url: &str, name: &str, text: &str) -> String {
    let file = dir.join(name);
    std::fs::write(&file, text).expect("cannot write the batch file");
    let out = kiln(&["submit", arg(&file), "--json", "--coordinator", url]);
    assert_eq!(out.code, 0, "submit {name}: {}", out.stderr);
    job_id(&out.stdout).expect("submit printed no job id")
}

/// Runs `kiln watch JOB` through `url` and asserts that every item succeeded.
pub fn watch_ok(url: &str, job: &str) {
    let out = kiln(&["watch", job, "--coordinator", url]);
    assert_eq!(
        out.code, 0,
        "watch {job} through {url}: {}\n{}",
        out.stdout, out.stderr
    );
}

/// Returns the tiny model, written once per test process by `kiln model tiny`.
pub fn tiny_model() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("kiln-tiny-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let out = kiln(&["model", "tiny", "--out", dir.to_str().unwrap_or_default()]);
        assert_eq!(out.code, 0, "kiln model tiny failed: {}", out.stderr);
        dir
    })
    .clone()
}

/// Polls `f` every 50 ms until it returns Some, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async form of [`wait_for`].
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A decoded PNG.
pub struct Png {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// RGB8 pixels.
    pub pixels: Vec<u8>,
}

/// Decodes a PNG file.
pub fn decode_png(path: &Path) -> anyhow::Result<Png> {
    let img = image::open(path)
        .with_context(|| format!("cannot decode {}", path.display()))?
        .to_rgb8();
    Ok(Png {
        width: img.width(),
        height: img.height(),
        pixels: img.into_raw(),
    })
}

/// Returns the `.png` files directly in `dir`, sorted.
pub fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "png"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Returns the JSON lines of `dir/manifest.jsonl`.
pub fn manifest(dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(dir.join("manifest.jsonl"))?;
    text.lines()
        .map(|l| serde_json::from_str(l).context("manifest line is not JSON"))
        .collect()
}

/// Returns the sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    Ok(hex::encode(sha2::Sha256::digest(std::fs::read(path)?)))
}

/// Writes a batch file: `prompts` x `seeds` at 64 px with `steps` DDIM steps.
pub fn sweep_file(
    path: &Path,
    model: &str,
    prompts: usize,
    seeds: usize,
    steps: u32,
) -> anyhow::Result<()> {
    let prompts: Vec<String> = (0..prompts)
        .map(|i| format!("\"subject number {i}, oil painting\""))
        .collect();
    let seeds: Vec<String> = (1..=seeds).map(|s| s.to_string()).collect();
    let text = format!(
        "[defaults]\nmodel = \"{model}\"\nwidth = 64\nheight = 64\nsteps = {steps}\nguidance = 5.0\nscheduler = \"ddim\"\n\n[sweep]\nprompt = [{}]\nseed = [{}]\n",
        prompts.join(", "),
        seeds.join(", ")
    );
    std::fs::write(path, text)?;
    Ok(())
}

/// Returns the job id (the first UUID) in `text`.
///
/// # Errors
/// When there is none.
pub fn job_id(text: &str) -> anyhow::Result<String> {
    for word in text.split(|c: char| !(c.is_ascii_hexdigit() || c == '-')) {
        if word.len() == 36 && uuid_like(word) {
            return Ok(word.to_string());
        }
    }
    bail!("no job id in {text:?}")
}

fn uuid_like(s: &str) -> bool {
    s.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
}

/// Runs a future to completion on a fresh single-threaded runtime.
pub fn block<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Returns a job with its tasks, through the Farm service.
pub fn get_job(url: &str, job: &str) -> kiln_proto::pb::GetJobResponse {
    block(async {
        let mut c = kiln_proto::connect::farm_client(
            kiln_proto::connect::channel("url", url, &Default::default()).expect("valid URL"),
            Bearer::none(),
        );
        c.get_job(kiln_proto::pb::GetJobRequest {
            job_id: job.to_string(),
            include_tasks: true,
        })
        .await
        .expect("GetJob")
        .into_inner()
    })
}

/// Returns every event of a finished job, through WatchJob from cursor 0.
pub fn events(url: &str, job: &str) -> Vec<kiln_proto::pb::JobEvent> {
    block(async {
        let mut c = kiln_proto::connect::farm_client(
            kiln_proto::connect::channel("url", url, &Default::default()).expect("valid URL"),
            Bearer::none(),
        );
        let mut stream = c
            .watch_job(kiln_proto::pb::WatchJobRequest {
                job_id: job.to_string(),
                after_cursor: 0,
                previews: false,
            })
            .await
            .expect("WatchJob")
            .into_inner();
        let mut out = Vec::new();
        while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the watch stream stalled")
            .expect("watch stream")
        {
            out.extend(msg.event);
        }
        out
    })
}

/// Fetches a finished job into `out` and checks that every one of `n` items
/// arrived exactly once: `n` decodable PNGs, `n` manifest lines with indices
/// 0..n, each file's sha256 as the manifest says.
pub fn assert_exactly_once(url: &str, job: &str, out: &Path, n: usize) {
    let fetch = kiln(&[
        "fetch",
        job,
        "--out",
        out.to_str().unwrap_or_default(),
        "--coordinator",
        url,
    ]);
    assert_eq!(fetch.code, 0, "kiln fetch: {}", fetch.stderr);
    let files = pngs(out);
    assert_eq!(files.len(), n, "images fetched");
    let lines = manifest(out).expect("manifest");
    assert_eq!(lines.len(), n, "manifest lines");
    let indices: std::collections::BTreeSet<u64> =
        lines.iter().filter_map(|l| l["index"].as_u64()).collect();
    assert_eq!(indices, (0..n as u64).collect(), "every index exactly once");
    for l in &lines {
        assert_eq!(l["status"], "completed", "{l}");
        let file = out.join(l["file"].as_str().unwrap_or_default());
        assert_eq!(
            sha256_file(&file).expect("image file"),
            l["sha256"].as_str().unwrap_or_default(),
            "{}",
            file.display()
        );
        decode_png(&file).expect("decodable");
    }
}

/// Waits until the coordinator lists `n` workers.
pub fn wait_for_workers(url: &str, n: usize) {
    wait_for(Duration::from_secs(60), "workers to register", || {
        let out = kiln(&["workers", "--json", "--coordinator", url]);
        let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        (list.as_array()?.len() >= n).then_some(())
    });
}

/// Returns a loopback port that was free a moment ago (for `--http`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// Sends `GET path` over plain HTTP/1.1 to `addr` (`HOST:PORT`), with
/// `Authorization: Bearer TOKEN` when a token is given; 10 s timeouts.
///
/// # Errors
/// When nothing answers or the answer is not HTTP.
pub fn http_get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<HttpAnswer> {
    use std::io::Read;
    let socket: std::net::SocketAddr = addr.parse().context("address")?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body).with_context(|| format!("bad chunked body: {body:?}"))?
    } else {
        body.to_string()
    };
    Ok(HttpAnswer { status, body })
}

/// Joins the chunks of a chunked HTTP/1.1 body.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

/// Sums the samples of the metric family `name` (every label set) in a
/// Prometheus text exposition; `None` when it has none.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value: f64 = line.rsplit(' ').next()?.parse().ok()?;
        *sum.get_or_insert(0.0) += value;
    }
    sum
}

/// Sends `GET path` to a coordinator's `https://` URL over HTTP/2 (what its
/// shared TLS port negotiates), trusting `ca`, through a kiln client channel.
///
/// # Errors
/// When the connection or the request fails.
pub async fn https_get(url: &str, ca: &Path, path: &str) -> anyhow::Result<HttpAnswer> {
    use http_body_util::BodyExt;
    use tower_service::Service;
    let tls = kiln_proto::connect::TlsOptions {
        ca: Some(ca.to_path_buf()),
        ..Default::default()
    };
    let mut channel = kiln_proto::connect::channel("url", url, &tls)?;
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
    let request = http::Request::get(format!("{url}{path}"))
        .body(tonic::body::Body::empty())
        .context("request")?;
    let answer = tokio::time::timeout(Duration::from_secs(10), channel.call(request))
        .await
        .context("no answer within 10 s")??;
    let status = answer.status().as_u16();
    let bytes = answer
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("body: {e}"))?
        .to_bytes();
    Ok(HttpAnswer {
        status,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}
