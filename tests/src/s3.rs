//! An S3 API for one test: by default a private `moto_server` (PyPI
//! `moto[server]`) on a free loopback port, stopped when dropped; or, when
//! `KILN_TEST_S3_ENDPOINT` is set, that endpoint with the credentials in
//! `KILN_TEST_S3_ACCESS_KEY` and `KILN_TEST_S3_SECRET_KEY` (how
//! `scripts/s3-seaweedfs` runs the same tests against SeaweedFS). Each test
//! gets a bucket of its own.
//!
//! moto is found through `KILN_TEST_MOTO` (the path of `moto_server`) or in
//! the virtual environment `.ci/run` makes, [`DEFAULT_VENV`]. The `python`
//! beside it (with boto3; `KILN_TEST_S3_PYTHON` names another) creates the
//! bucket and lists it as a foreign client. When moto is missing, the test
//! fails with the command that installs it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where `.ci/run` installs moto when `KILN_TEST_MOTO` is not set.
pub const DEFAULT_VENV: &str = "/tmp/kiln-test-moto";

/// An S3 API owned by a test, with an empty bucket of its own.
pub struct S3Server {
    /// The moto process, when this test started one.
    child: Option<Child>,
    endpoint: String,
    access_key: String,
    secret_key: String,
    bucket: String,
    python: PathBuf,
    /// moto's output, for failure messages.
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

/// Returns a bucket name no other test of any process uses.
fn fresh_bucket() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "kiln-test-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl S3Server {
    /// Starts moto (or takes the endpoint of `KILN_TEST_S3_ENDPOINT`) and
    /// creates an empty bucket; fails with an install hint when moto is missing.
    pub fn start() -> anyhow::Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let python = std::env::var_os("KILN_TEST_S3_PYTHON").map(PathBuf::from);
        let mut server = if let Ok(endpoint) = std::env::var("KILN_TEST_S3_ENDPOINT") {
            let var = |name: &str| {
                std::env::var(name)
                    .with_context(|| format!("KILN_TEST_S3_ENDPOINT is set, so {name} must be too"))
            };
            Self {
                child: None,
                endpoint,
                access_key: var("KILN_TEST_S3_ACCESS_KEY")?,
                secret_key: var("KILN_TEST_S3_SECRET_KEY")?,
                bucket: fresh_bucket(),
                python: python.context(
                    "KILN_TEST_S3_ENDPOINT needs KILN_TEST_S3_PYTHON (a python with boto3)",
                )?,
                log,
            }
        } else {
            let bin = moto_binary()?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(log.reopen()?)
                .stderr(log.reopen()?)
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            Self {
                child: Some(child),
                endpoint: format!("http://127.0.0.1:{port}"),
                // moto accepts any key.
                access_key: "test".into(),
                secret_key: "test".into(),
                bucket: fresh_bucket(),
                python: python.unwrap_or_else(|| bin.with_file_name("python")),
                log,
            }
        };
        if server.child.is_some() {
            server.wait_for_moto()?;
        }
        let bucket = server.bucket.clone();
        server.boto3(
            "import boto3, sys\nboto3.client('s3').create_bucket(Bucket=sys.argv[1])\n",
            &[&bucket],
        )?;
        Ok(server)
    }

    /// Waits until the moto started here accepts connections.
    fn wait_for_moto(&mut self) -> anyhow::Result<()> {
        let port = self
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .context("the S3 endpoint has no port")?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the S3 API did not answer on port {port} within 60 s\n{}",
                    std::fs::read_to_string(self.log.path()).unwrap_or_default()
                );
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "moto_server exited with {status}\n{}",
                    std::fs::read_to_string(self.log.path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Returns the test's bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Returns the endpoint URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Returns the `AWS_*` variables a client of this server needs.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Returns the keys of every object under `prefix` in the bucket, as
    /// boto3 lists them (sorted).
    pub fn keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        self.boto3(
            "import boto3, sys\n\
             s3 = boto3.client('s3')\n\
             for p in s3.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[1], Prefix=sys.argv[2]):\n\
             \x20   for o in p.get('Contents', []): print(o['Key'])\n",
            &[&self.bucket, prefix],
        )
        .map(|out| out.lines().map(str::to_string).collect())
    }

    /// Returns the bytes of one object of the bucket.
    pub fn get(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let out = self.boto3(
            "import boto3, sys\n\
             body = boto3.client('s3').get_object(Bucket=sys.argv[1], Key=sys.argv[2])['Body'].read()\n\
             sys.stdout.write(body.hex())\n",
            &[&self.bucket, key],
        )?;
        Ok(hex::decode(out.trim())?)
    }

    /// Writes `bytes` as one object of the bucket, replacing any there.
    pub fn put(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.boto3(
            "import boto3, sys\n\
             boto3.client('s3').put_object(Bucket=sys.argv[1], Key=sys.argv[2], Body=bytes.fromhex(sys.argv[3]))\n",
            &[&self.bucket, key, &hex::encode(bytes)],
        )
        .map(drop)
    }

    /// Deletes one object of the bucket.
    pub fn delete(&self, key: &str) -> anyhow::Result<()> {
        self.boto3(
            "import boto3, sys\n\
             boto3.client('s3').delete_object(Bucket=sys.argv[1], Key=sys.argv[2])\n",
            &[&self.bucket, key],
        )
        .map(drop)
    }

    /// Runs a Python script with the venv's interpreter and this server's
    /// settings, and returns its standard output.
    fn boto3(&self, script: &str, args: &[&str]) -> anyhow::Result<String> {
        let python = &self.python;
        let out = Command::new(python)
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

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
