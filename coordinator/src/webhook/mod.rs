//! Webhooks: when a job ends, a signed JSON POST to each of its targets (the
//! batch file's `notify` and the coordinator's `--webhook`s), retried with
//! backoff until a 2xx answer or the deadline.
//!
//! Delivery is at least once across coordinator crashes: the store opens a
//! [`Delivery`] in the same transition that ends the job, and every
//! coordinator runs [`run`], which claims due deliveries under a lease
//! ([`Store::claim_deliveries`](crate::store::Store::claim_deliveries)), so a
//! delivery whose coordinator died is claimed again by another when its
//! lease runs out. Before the first POST the loop makes sure the manifest is
//! written, so a receiver can read it at once.

pub mod address;
pub mod payload;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use kiln_proto::error::FieldError;
use kiln_proto::webhook::parse_target;
use tokio::time::MissedTickBehavior;

pub use self::payload::{Payload, SIGNATURE_HEADER, Secret};
use crate::core::Core;
use crate::results;
use crate::store::{Delivery, StoreError};

/// How often each coordinator looks for due deliveries.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Deliveries one look claims.
const CLAIM_BATCH: usize = 16;
/// How long a claim keeps a delivery from other coordinators: longer than
/// one round takes (the targets are called at once, each within
/// [`address::RESOLVE_TIMEOUT`] + [`REQUEST_TIMEOUT`]), so only a dead
/// coordinator's claim runs out.
const CLAIM_LEASE: Duration = Duration::from_secs(60);
/// Longest one POST may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the connection of one POST may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Wait before the first retry; it doubles with each attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why the webhook settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A `--webhook` URL is malformed.
    #[error("{0}")]
    Url(#[from] FieldError),
    /// The secret file cannot be read or is empty.
    #[error("--webhook-secret-file {path}: {message}")]
    Secret {
        /// The file.
        path: String,
        /// What is wrong (never its content).
        message: String,
    },
}

/// The coordinator's webhook settings.
#[derive(Debug)]
pub struct Webhooks {
    /// `--webhook`: targets added to every submitted job.
    urls: Vec<String>,
    /// `--webhook-secret-file`: signs every body when set.
    secret: Option<Secret>,
    /// `--webhook-allow-private`: targets may resolve to any address.
    allow_private: bool,
    /// How long after a job ended its delivery is retried.
    deadline: Duration,
}

impl Webhooks {
    /// Returns settings with no farm-wide target, no secret, private
    /// addresses refused, and a one-hour deadline.
    pub fn off() -> Self {
        Self {
            urls: Vec::new(),
            secret: None,
            allow_private: false,
            deadline: Duration::from_secs(3600),
        }
    }

    /// Returns the settings of the coordinator's flags, checking every URL
    /// by the batch file's rule.
    ///
    /// # Errors
    /// `Url` naming `--webhook` for a malformed URL.
    pub fn new(
        urls: Vec<String>,
        secret: Option<Secret>,
        allow_private: bool,
        deadline: Duration,
    ) -> Result<Self, WebhookError> {
        for url in &urls {
            parse_target("--webhook", url)?;
        }
        Ok(Self {
            urls,
            secret,
            allow_private,
            deadline,
        })
    }

    /// Reads the secret of `--webhook-secret-file`: its first line.
    ///
    /// # Errors
    /// `Secret` for an unreadable or empty file; the message never shows the content.
    pub fn read_secret(path: &Path) -> Result<Secret, WebhookError> {
        let err = |message: String| WebhookError::Secret {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Secret::from_file_text(&text).ok_or_else(|| err("is empty".into()))
    }

    /// Returns the targets of a job: its own `notify` URLs, then the
    /// coordinator's, each once.
    pub fn targets(&self, notify: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(notify.len() + self.urls.len());
        for url in notify.iter().chain(&self.urls) {
            if !out.contains(url) {
                out.push(url.clone());
            }
        }
        out
    }

    /// Returns true when bodies are signed.
    pub fn signs(&self) -> bool {
        self.secret.is_some()
    }
}

/// Returns the wait before attempt `attempt + 1`: [`FIRST_BACKOFF`] doubled
/// per attempt, at most [`MAX_BACKOFF`].
fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

/// How one POST went.
enum Sent {
    /// A 2xx answer.
    Delivered,
    /// Worth trying again later.
    Retry(String),
    /// Never to be tried again (a refused address, a malformed URL).
    Refused(String),
}

/// Claims and delivers due webhooks every [`POLL_INTERVAL`] until shutdown.
pub async fn run(core: Arc<Core>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = core.shutdown.cancelled() => return,
        }
        match core.store.claim_deliveries(CLAIM_BATCH, CLAIM_LEASE).await {
            Ok(due) => {
                join_all(due.into_iter().map(|d| deliver(&core, d))).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot claim webhook deliveries; retrying"),
        }
    }
}

/// Makes one attempt at a claimed delivery and settles it in the store.
async fn deliver(core: &Core, d: Delivery) {
    let hooks = &core.webhooks;
    let (done, failures) = match attempt(core, &d).await {
        Ok(outcome) => outcome,
        Err(why) => (Vec::new(), vec![why]),
    };
    let left = d.pending.len() - done.len();
    let retry_in = backoff(d.attempt);
    let retry = if left == 0 {
        None
    } else if d.age + retry_in > hooks.deadline {
        tracing::error!(job = %d.job, attempts = d.attempt, undelivered = left, errors = ?failures, "webhook not delivered before the deadline; giving up");
        None
    } else {
        tracing::warn!(job = %d.job, attempt = d.attempt, undelivered = left, retry_in = ?retry_in, errors = ?failures, "webhook not delivered; retrying");
        Some(retry_in)
    };
    if let Err(e) = core
        .store
        .settle_delivery(d.job, d.attempt, &done, retry)
        .await
    {
        // The claim then runs out and the delivery is tried again.
        tracing::warn!(job = %d.job, error = %e, "cannot record a webhook delivery");
    }
}

/// POSTs the job's body to every pending target at once. Returns the
/// targets that are done (delivered, or refused for good) and why the
/// others failed; an error when the body itself cannot be made yet.
async fn attempt(core: &Core, d: &Delivery) -> Result<(Vec<String>, Vec<String>), String> {
    let job = match core.store.job(d.job).await {
        Ok(job) => job,
        Err(StoreError::JobNotFound(_)) => {
            // Past retention: nothing left to say; the delivery closes.
            tracing::warn!(job = %d.job, "job gone from the store; its webhook is dropped");
            return Ok((d.pending.clone(), Vec::new()));
        }
        Err(e) => return Err(format!("reading the job: {e}")),
    };
    let folder = results::folder(job.id, job.verify_of);
    // The coordinator that ended the job writes the manifest; if it died
    // first, it is written here, so the receiver finds it complete.
    match core.results.has_manifest(&folder).await {
        Ok(true) => {}
        Ok(false) => core
            .write_manifest(job.id)
            .await
            .map_err(|e| format!("writing the manifest: {e}"))?,
        Err(e) => return Err(format!("looking for the manifest: {e}")),
    }
    let body = Payload::new(&job, core.results.manifest_url(&folder)).to_bytes();
    let signature = core.webhooks.secret.as_ref().map(|s| s.sign(&body));
    let sends = d.pending.iter().map(|url| {
        let body = body.clone();
        let signature = signature.clone();
        async move {
            let sent = send(url, body, signature, core.webhooks.allow_private).await;
            (url, sent)
        }
    });
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for (url, sent) in join_all(sends).await {
        let host = parse_target("webhook", url)
            .map(|t| t.host.to_string())
            .unwrap_or_default();
        match sent {
            Sent::Delivered => {
                tracing::info!(job = %d.job, target = %host, attempt = d.attempt, "webhook delivered");
                done.push(url.clone());
            }
            Sent::Refused(why) => {
                tracing::warn!(job = %d.job, target = %host, reason = %why, "webhook target refused; not retried");
                done.push(url.clone());
            }
            Sent::Retry(why) => failures.push(format!("{host}: {why}")),
        }
    }
    Ok((done, failures))
}

/// POSTs `body` to `url`, connecting only to the addresses checked by
/// [`address::resolve`]. Redirects are not followed: a 3xx could point at
/// an address the check would refuse.
async fn send(url: &str, body: Vec<u8>, signature: Option<String>, allow_private: bool) -> Sent {
    let target = match parse_target("webhook", url) {
        Ok(t) => t,
        Err(e) => return Sent::Refused(e.to_string()),
    };
    let addrs = match address::resolve(&target, allow_private).await {
        Ok(a) => a,
        Err(e) if e.is_transient() => return Sent::Retry(e.to_string()),
        Err(e) => return Sent::Refused(e.to_string()),
    };
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .resolve_to_addrs(target.host, &addrs)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => return Sent::Retry(format!("cannot build the HTTP client: {e}")),
    };
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(signature) = signature {
        request = request.header(SIGNATURE_HEADER, signature);
    }
    match request.send().await {
        Ok(answer) if answer.status().is_success() => Sent::Delivered,
        Ok(answer) => Sent::Retry(format!("answered {}", answer.status())),
        // Without the URL: its path may hold a token.
        Err(e) => Sent::Retry(e.without_url().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_limit() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn a_job_lists_its_own_targets_then_the_farms_once() {
        let hooks = Webhooks::new(
            vec!["https://farm.example/h".into(), "https://a.example/".into()],
            None,
            false,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(
            hooks.targets(&["https://a.example/".into()]),
            ["https://a.example/", "https://farm.example/h"]
        );
        let e = Webhooks::new(vec!["ftp://x".into()], None, false, Duration::ZERO).unwrap_err();
        assert!(
            e.to_string().starts_with("--webhook: must be an http"),
            "{e}"
        );
    }
}
