//! A private `redis-server` for one test: a free loopback port, a temporary
//! directory, AOF on, `noeviction`, optionally a password, stopped when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running redis-server owned by a test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Returns true once `PING` on the port answers `+PONG` (after `AUTH` with
/// `password` when there is one).
fn pong(port: u16, password: Option<&str>) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut request = Vec::new();
    if let Some(password) = password {
        request.extend_from_slice(format!("AUTH {password}\r\n").as_bytes());
    }
    request.extend_from_slice(b"PING\r\n");
    if s.write_all(&request).is_err() {
        return false;
    }
    // The answers to AUTH and PING may come in one read or two.
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
        if answer.windows(5).any(|w| w == b"+PONG") {
            return true;
        }
    }
    false
}

impl RedisServer {
    /// Starts a server; fails with an install hint when `redis-server` is missing.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// Starts a server that requires `password` (`--requirepass`).
    pub fn start_with_password(password: &str) -> anyhow::Result<Self> {
        Self::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> anyhow::Result<Self> {
        let mut last = None;
        // A free port can be taken between the check and the bind: try a few.
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("kiln-redis-").tempdir()?;
            let mut server = Self {
                child: None,
                port: free_port()?,
                dir,
                password: password.map(str::to_string),
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.path().join("redis.log"))?;
        let mut command = Command::new("redis-server");
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .args(["--maxmemory-policy", "noeviction", "--daemonize", "no"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context(
                "cannot start redis-server: install it (apt-get install redis-server; README's test command does)",
            )?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if pong(self.port, self.password.as_deref()) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!("redis-server exited at start ({status})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server did not answer PING within 20 s")
    }

    /// Returns the server's URL, with its password when it has one.
    pub fn url(&self) -> String {
        match &self.password {
            None => format!("redis://127.0.0.1:{}/0", self.port),
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
        }
    }

    /// Returns the server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the server's data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL: nothing is flushed beyond what AOF already wrote).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and directory (AOF is replayed).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Sends a signal to the server (`STOP` makes it unreachable until `CONT`).
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Returns the path of the server log.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}
