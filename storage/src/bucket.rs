//! Buckets: `s3://`, `gs://` and `az://` URLs turned into `object_store`
//! clients, each configured from its cloud's usual environment variables,
//! with kiln's timeouts and retries, and scoped to the URL's prefix. The
//! coordinator's result store, the worker's model downloads and
//! `kiln model push` all open their buckets here.
//!
//! Only S3 is exercised by kiln's tests (against moto, and SeaweedFS by
//! `scripts/s3-seaweedfs`); GCS and Azure go through the same crate and the
//! same code, untested here.

use std::sync::Arc;
use std::time::Duration;

use kiln_domain::error::quote;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

/// Longest one request to the bucket may take, from connecting to the last
/// byte of the answer: a PNG is at most a few tens of MiB (see
/// `kiln_proto::MAX_MESSAGE_BYTES`), so a minute is slow but alive.
const REQUEST_TIMEOUT: &str = "60s";
/// Longest a connection to the endpoint may take to open.
const CONNECT_TIMEOUT: &str = "5s";
/// Retries of a request that failed with a network error, a 5xx or a
/// throttling answer. Each is at most [`REQUEST_TIMEOUT`], and all of them
/// together at most [`RETRY_TIMEOUT`].
const MAX_RETRIES: usize = 5;
/// Longest a request and its retries may take together: a completion holds
/// its worker's report for this long at most before the worker retries it.
const RETRY_TIMEOUT: Duration = Duration::from_secs(120);
/// First wait between retries; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// A bucket URL taken apart.
#[derive(Debug, PartialEq)]
pub struct Bucket {
    /// The URL as given (the builders read bucket and account from it).
    url: String,
    /// `s3`, `gs` or `az`.
    scheme: String,
    /// Where in the bucket kiln's files go; empty for the bucket's top.
    prefix: String,
}

/// The URL schemes [`Bucket::from_url`] takes.
pub const SCHEMES: &[&str] = &["s3", "gs", "az"];

impl Bucket {
    /// Takes a whole bucket URL apart, as `s3://BUCKET/PREFIX`.
    ///
    /// # Errors
    /// A message for a URL that is not `s3://`, `gs://` or `az://`, or has no bucket.
    pub fn from_url(url: &str) -> Result<Self, String> {
        match url.split_once("://") {
            Some((scheme, rest)) if SCHEMES.contains(&scheme) => Self::parse(url, scheme, rest),
            _ => Err(format!(
                "not a bucket URL: write s3://BUCKET/PREFIX (or gs://, az://), got {}",
                quote(url)
            )),
        }
    }

    /// Takes `SCHEME://BUCKET/PREFIX` apart; `rest` is what follows `://`.
    ///
    /// # Errors
    /// A message for a URL without a bucket.
    pub fn parse(url: &str, scheme: &str, rest: &str) -> Result<Self, String> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!(
                "no bucket: write {scheme}://BUCKET/PREFIX, got {}",
                quote(url)
            ));
        }
        Ok(Self {
            url: format!("{scheme}://{bucket}"),
            scheme: scheme.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// Builds the client: the cloud's variables among `env` (`AWS_*`,
    /// `GOOGLE_*` or `AZURE_*`, as its `from_env` reads them), then kiln's
    /// timeouts and retries, scoped to the prefix.
    ///
    /// # Errors
    /// The backend's words when it refuses its settings.
    pub fn open(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Arc<dyn ObjectStore>, String> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: FIRST_BACKOFF,
                max_backoff: MAX_BACKOFF,
                base: 2.0,
            },
            max_retries: MAX_RETRIES,
            retry_timeout: RETRY_TIMEOUT,
        };
        let timeout = ClientConfigKey::Timeout;
        let connect = ClientConfigKey::ConnectTimeout;
        let store: Arc<dyn ObjectStore> = match self.scheme.as_str() {
            "s3" => Arc::new(
                settings(&env, "AWS_", AmazonS3Builder::new(), |b, k, v| {
                    b.with_config(k, v)
                })
                .with_url(&self.url)
                .with_config(AmazonS3ConfigKey::Client(timeout), REQUEST_TIMEOUT)
                .with_config(AmazonS3ConfigKey::Client(connect), CONNECT_TIMEOUT)
                .with_retry(retry)
                .build()
                .map_err(|e| e.to_string())?,
            ),
            "gs" => Arc::new(
                settings(
                    &env,
                    "GOOGLE_",
                    GoogleCloudStorageBuilder::new(),
                    |b, k, v| b.with_config(k, v),
                )
                .with_url(&self.url)
                .with_config(GoogleConfigKey::Client(timeout), REQUEST_TIMEOUT)
                .with_config(GoogleConfigKey::Client(connect), CONNECT_TIMEOUT)
                .with_retry(retry)
                .build()
                .map_err(|e| e.to_string())?,
            ),
            "az" => Arc::new(
                settings(&env, "AZURE_", MicrosoftAzureBuilder::new(), |b, k, v| {
                    b.with_config(k, v)
                })
                .with_url(&self.url)
                .with_config(AzureConfigKey::Client(timeout), REQUEST_TIMEOUT)
                .with_config(AzureConfigKey::Client(connect), CONNECT_TIMEOUT)
                .with_retry(retry)
                .build()
                .map_err(|e| e.to_string())?,
            ),
            other => return Err(format!("unknown scheme {}", quote(other))),
        };
        if self.prefix.is_empty() {
            Ok(store)
        } else {
            Ok(Arc::new(PrefixStore::new(store, self.prefix.as_str())))
        }
    }
}

/// Applies every variable of `env` named `PREFIX…` that the builder knows
/// (as `AWS_REGION` → `aws_region`), the way each builder's `from_env` does.
fn settings<B, K: std::str::FromStr>(
    env: &[(String, String)],
    prefix: &str,
    builder: B,
    set: impl Fn(B, K, &str) -> B,
) -> B {
    env.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .fold(builder, |b, (k, v)| match k.to_ascii_lowercase().parse() {
            Ok(key) => set(b, key, v),
            Err(_) => b,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        let b = Bucket::parse("s3://kiln/farm/a/", "s3", "kiln/farm/a/").unwrap();
        assert_eq!(b.url, "s3://kiln");
        assert_eq!(b.prefix, "farm/a");
        let b = Bucket::parse("gs://kiln", "gs", "kiln").unwrap();
        assert_eq!((b.url.as_str(), b.prefix.as_str()), ("gs://kiln", ""));
        let e = Bucket::parse("az:///x", "az", "/x").unwrap_err();
        assert_eq!(e, "no bucket: write az://BUCKET/PREFIX, got \"az:///x\"");
        let b = Bucket::from_url("s3://kiln/models/tiny").unwrap();
        assert_eq!(
            (b.url.as_str(), b.prefix.as_str()),
            ("s3://kiln", "models/tiny")
        );
        assert!(Bucket::from_url("/tmp/models").is_err());
        assert!(Bucket::from_url("http://kiln/x").is_err());
    }
}
