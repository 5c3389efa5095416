//! What a webhook says: the JSON body POSTed when a job ends, and its
//! signature, `X-Kiln-Signature: sha256=HEX`, the HMAC-SHA256 of the exact
//! body bytes under the farm's secret (`--webhook-secret-file`).

use ring::hmac;
use serde::Serialize;

use crate::store::{JobRecord, TaskCounts};

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "X-Kiln-Signature";

/// The body of a webhook.
#[derive(Debug, Serialize)]
pub struct Payload<'a> {
    /// The job's id.
    pub job_id: String,
    /// The job's name.
    pub name: &'a str,
    /// The job's project.
    pub project: &'a str,
    /// How it ended: `completed`, `failed` or `cancelled`.
    pub state: &'static str,
    /// Its tasks by state.
    pub counts: TaskCounts,
    /// Where its manifest lives in the result store, as a URL of the store
    /// (`s3://bucket/prefix/<job>/manifest.jsonl`) or a directory path.
    pub manifest: String,
    /// When it ended, Unix milliseconds.
    pub finished_at_ms: Option<i64>,
}

impl<'a> Payload<'a> {
    /// Returns the body for an ended job whose manifest is at `manifest`.
    pub fn new(job: &'a JobRecord, manifest: String) -> Self {
        Self {
            job_id: job.id.to_string(),
            name: &job.name,
            project: &job.project,
            state: job.state.name(),
            counts: job.counts,
            manifest,
            finished_at_ms: job.finished_at_ms,
        }
    }

    /// Returns the JSON bytes that are sent and signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings and numbers only: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The shared secret of webhook signatures. Its `Debug` shows no byte of it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

impl Secret {
    /// Returns the secret in a file's text: its first line, without the line
    /// break or surrounding spaces (what `echo SECRET > FILE` writes).
    /// None for an empty one.
    pub fn from_file_text(text: &str) -> Option<Self> {
        let line = text.lines().next().unwrap_or_default().trim();
        (!line.is_empty()).then(|| Self(line.as_bytes().to_vec()))
    }

    /// Returns the header value for `body`: `sha256=` and the lower-case hex
    /// HMAC-SHA256 of it.
    pub fn sign(&self, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        let secret = Secret::from_file_text("key\n").unwrap();
        // RFC 4231-style check against a known value (Python:
        // hmac.new(b"key", b"The quick brown fox jumps over the lazy dog", "sha256")).
        assert_eq!(
            secret.sign(b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert!(Secret::from_file_text(" \n").is_none());
        assert_eq!(format!("{secret:?}"), "Secret(3 bytes)");
    }
}
