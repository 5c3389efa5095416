//! A private S3 API for one test: `moto_server` (PyPI `moto[server]`) on a
//! free loopback port with one bucket, stopped when dropped.
//!
//! The server is found through `KILN_TEST_MOTO` (the path of `moto_server`)
//! or in the virtual environment `.ci/run` makes, [`DEFAULT_VENV`]. The
//! `python` beside it (with boto3) lists the bucket as a foreign client.
//! When it is missing, the test fails with the command that installs it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where `.ci/run` installs moto when `KILN_TEST_MOTO` is not set.
pub const DEFAULT_VENV: &str = "/tmp/kiln-test-moto";

/// The bucket every server starts with.
pub const BUCKET: &str = "kiln-test";

/// A running moto server owned by a test.
pub struct MotoServer {
    child: Child,
    port: u16,
    bin: PathBuf,
    /// Its output, for failure messages.
    log: tempfile::NamedTempFile,
}

/// Returns the path of `moto_server`.
fn moto_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("KILN_TEST_MOTO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_VENV).join("bin/moto_server"));
    if !path.exists() {
        bail!(
            "{} is missing: the S3 tests need moto. Install it with `python3 -m venv {DEFAULT_VENV} && {DEFAULT_VENV}/bin/pip install 'moto[server]' boto3` (`.ci/run` does), or point KILN_TEST_MOTO at a moto_server",
            path.display()
        );
    }
    Ok(path)
}

/// Sends one HTTP/1.1 request without a body and returns the status line.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer.lines().next().unwrap_or_default().to_string())
}

impl MotoServer {
    /// Starts a server with an empty bucket [`BUCKET`]; fails with an install
    /// hint when moto is missing.
    pub fn start() -> anyhow::Result<Self> {
        let bin = moto_binary()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = tempfile::NamedTempFile::new()?;
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let server = Self {
            child,
            port,
            bin,
            log,
        };
        let start = Instant::now();
        loop {
            // moto accepts unsigned requests: a plain PUT creates the bucket.
            match http(port, "PUT", &format!("/{BUCKET}")) {
                Ok(status) if status.contains(" 200 ") => return Ok(server),
                Ok(status) => bail!("moto refused to create the bucket: {status}"),
                Err(_) if start.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => bail!(
                    "moto_server did not answer on port {port} within 60 s: {e}\n{}",
                    std::fs::read_to_string(server.log.path()).unwrap_or_default()
                ),
            }
        }
    }

    /// Returns the endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Returns the `AWS_*` variables a client of this server needs.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Returns the keys of every object under `prefix` in [`BUCKET`], as
    /// boto3 lists them (sorted).
    pub fn keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        self.boto3(
            "import boto3, sys\n\
             s3 = boto3.client('s3')\n\
             for p in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[1], Prefix=sys.argv[2]):\n\
             \x20   for o in p.get('Contents', []): print(o['Key'])\n",
            &[BUCKET, prefix],
        )
        .map(|out| out.lines().map(str::to_string).collect())
    }

    /// Returns the bytes of one object of [`BUCKET`].
    pub fn get(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let out = self.boto3(
            "import boto3, sys\n\
             body = boto3.client('s3').get_object(Bucket=sys.argv[1], Key=sys.argv[2])['Body'].read()\n\
             sys.stdout.write(body.hex())\n",
            &[BUCKET, key],
        )?;
        Ok(hex::decode(out.trim())?)
    }

    /// Runs a Python script with the venv's interpreter and this server's
    /// settings, and returns its standard output.
    fn boto3(&self, script: &str, args: &[&str]) -> anyhow::Result<String> {
        let python = self.bin.with_file_name("python");
        let out = Command::new(&python)
            .arg("-c")
            .arg(script)
            .args(args)
            .envs(self.env())
            .output()
            .with_context(|| format!("cannot run {}", python.display()))?;
        if !out.status.success() {
            bail!("boto3: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
