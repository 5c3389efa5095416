//! `kiln model pull REPO --out DIR`: downloads the files of a diffusers
//! repository on the Hugging Face hub that kiln's pipeline reads.
//!
//! Which files is decided by `crate::hub::select` from the repository's
//! listing and its `model_index.json`. Downloads go through the `hf-hub`
//! crate into a staging cache inside `DIR` (`DIR/.kiln-pull`), where an
//! interrupted file resumes from its last committed 10 MB chunk on the next
//! run; each finished file is moved to its place in `DIR`, and a file already
//! there with the size the hub reports is not downloaded again.
//!
//! Every request has a deadline: the listing must answer within
//! [`LISTING_TIMEOUT`], and a download that receives nothing for
//! [`STALL_TIMEOUT`] is abandoned (hf-hub's client has no timeout of its own,
//! so a watchdog on its progress reports does it). The token comes from
//! `HF_TOKEN` or the token file `huggingface-cli login` writes; `HF_ENDPOINT`
//! points at a mirror.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::hub::{MODEL_INDEX, Variant, select};
use anyhow::{Context, anyhow, bail};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use hf_hub::api::tokio::{ApiBuilder, ApiError, ApiRepo, Progress};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_worker::catalog::format_size;

/// Deadline of the repository listing request, body included.
pub const LISTING_TIMEOUT: Duration = Duration::from_secs(30);
/// A download that receives no byte for this long is abandoned (it resumes on the next run).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The hub, unless `HF_ENDPOINT` names a mirror.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// hf-hub's cache inside the output folder: partial downloads live here.
const STAGING: &str = ".kiln-pull";

/// Download a diffusers repository from the Hugging Face hub: only the files kiln reads.
#[derive(clap::Args, Debug)]
pub struct Pull {
    /// The repository, e.g. stabilityai/sdxl-turbo (gated ones need HF_TOKEN).
    repo: String,
    /// The folder to write it to; run again to resume an interrupted pull.
    #[arg(long)]
    out: PathBuf,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Weights precision: fp32 (default) or fp16 (the *.fp16.safetensors variant).
    #[arg(
        long,
        default_value = "fp32",
        value_parser = PossibleValuesParser::new(["fp32", "fp16"]).try_map(|v| Variant::parse(&v))
    )]
    variant: Variant,
}

/// One file of the repository listing.
#[derive(Debug, serde::Deserialize)]
struct Sibling {
    rfilename: String,
    /// Present when the listing is asked with `blobs=true`.
    size: Option<u64>,
}

/// The part of the hub's model info kiln reads.
#[derive(Debug, serde::Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    siblings: Vec<Sibling>,
}

impl Pull {
    /// Runs `kiln model pull`.
    ///
    /// # Errors
    /// A malformed repository name, an unreachable hub (`cannot reach HOST: …`),
    /// an unknown or gated repository, a repository without the files kiln
    /// needs, a stalled download, or a disk error, each naming what failed.
    pub async fn run(self) -> anyhow::Result<()> {
        check_repo_id(&self.repo)?;
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let host = host_of(&endpoint);
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| Cache::from_env().token());
        let staging = self.out.join(STAGING);
        let api = ApiBuilder::new()
            .with_cache_dir(staging.clone())
            .with_endpoint(endpoint.clone())
            .with_token(token)
            .with_progress(false)
            .build()
            .context("cannot set up the hub client")?;
        let repo = api.repo(Repo::with_revision(
            self.repo.to_string(),
            RepoType::Model,
            self.revision.to_string(),
        ));

        let info = listing(&repo, &host, &self.repo, &self.revision).await?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
        let size_of = |file: &str| {
            info.siblings
                .iter()
                .find(|s| s.rfilename == file)
                .and_then(|s| s.size)
        };
        if !names.iter().any(|n| n == MODEL_INDEX) {
            // The selection says why in full; fail before downloading anything.
            select(&names, "{}", self.variant)?;
        }
        let mut written = 0usize;
        let mut kept = 0usize;
        let mut bytes = 0u64;
        let fetch = |file: String| {
            let repo = &repo;
            let host = host.clone();
            let out = self.out.to_path_buf();
            let expected = size_of(&file);
            async move { fetch_file(repo, &host, &file, expected, &out).await }
        };
        match fetch(MODEL_INDEX.to_string()).await? {
            Fetched::Kept => kept += 1,
            Fetched::Written(n) => (written, bytes) = (written + 1, bytes + n),
        }
        let index_path = self.out.join(MODEL_INDEX);
        let index = std::fs::read_to_string(&index_path)
            .with_context(|| format!("cannot read {}", index_path.display()))?;
        let selection = select(&names, &index, self.variant)
            .with_context(|| format!("{} cannot be used as a kiln model", self.repo))?;
        for note in &selection.notes {
            eprintln!("kiln: note: {note}");
        }
        let total: u64 = selection.files.iter().filter_map(|f| size_of(f)).sum();
        eprintln!(
            "kiln: {} files of {} ({}) into {}",
            selection.files.len(),
            self.repo,
            format_size(total),
            self.out.display()
        );
        for file in selection.files.iter().filter(|f| *f != MODEL_INDEX) {
            match fetch(file.clone()).await? {
                Fetched::Kept => kept += 1,
                Fetched::Written(n) => (written, bytes) = (written + 1, bytes + n),
            }
        }
        // Everything is in place: the staging cache holds nothing worth keeping.
        if let Err(e) = std::fs::remove_dir_all(&staging)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %staging.display(), error = %e, "cannot remove the download staging folder");
        }
        let commit = info.sha.as_deref().map_or("", |s| &s[..s.len().min(12)]);
        println!(
            "pulled {}@{} ({commit}) into {}: {written} files downloaded ({}), {kept} already present",
            self.repo,
            self.revision,
            self.out.display(),
            format_size(bytes)
        );
        let out = self.out.to_path_buf();
        match tokio::task::spawn_blocking(move || kiln_diffusion::model_hash(&out)).await {
            Ok(Ok(hash)) => println!("model hash {hash}"),
            Ok(Err(e)) => eprintln!("kiln: warning: the folder cannot be hashed yet: {e}"),
            Err(e) => eprintln!("kiln: warning: hashing stopped: {e}"),
        }
        Ok(())
    }
}

/// Checks `owner/name` (or a bare `name`) as the hub spells repository ids.
fn check_repo_id(repo: &str) -> anyhow::Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let ok = match repo.split_once('/') {
        Some((owner, name)) => part_ok(owner) && part_ok(name),
        None => part_ok(repo),
    };
    if !ok {
        bail!("REPO must be a hub repository id such as stabilityai/sdxl-turbo, got {repo:?}");
    }
    Ok(())
}

/// Returns the host of an endpoint URL, for messages.
fn host_of(endpoint: &str) -> String {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// Fetches the repository listing with file sizes.
async fn listing(
    repo: &ApiRepo,
    host: &str,
    repo_id: &str,
    revision: &str,
) -> anyhow::Result<RepoInfo> {
    let response = repo
        .info_request()
        .query(&[("blobs", "true")])
        .timeout(LISTING_TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable_hub(host, &e))?;
    let status = response.status().as_u16();
    match status {
        200..=299 => {}
        401 | 403 | 404 => bail!(
            "{repo_id}@{revision}: not found on {host} or not accessible (HTTP {status}); check \
             the name and revision, and for a gated or private repository accept its terms on \
             {host} and set HF_TOKEN"
        ),
        _ => bail!("{host} answered HTTP {status} for the listing of {repo_id}@{revision}"),
    }
    let body = response
        .text()
        .await
        .map_err(|e| unreachable_hub(host, &e))?;
    serde_json::from_str(&body)
        .with_context(|| format!("{host} sent a listing of {repo_id} that kiln cannot read"))
}

/// What happened to one file.
enum Fetched {
    /// Already in place with the right size.
    Kept,
    /// Downloaded now, this many bytes.
    Written(u64),
}

/// Puts one repository file in place under `out`, unless it is there already.
async fn fetch_file(
    repo: &ApiRepo,
    host: &str,
    file: &str,
    expected: Option<u64>,
    out: &Path,
) -> anyhow::Result<Fetched> {
    let target = out.join(file);
    if let (Ok(meta), Some(size)) = (std::fs::metadata(&target), expected)
        && meta.is_file()
        && meta.len() == size
    {
        return Ok(Fetched::Kept);
    }
    let sized = expected.map_or(String::new(), |s| format!(" ({})", format_size(s)));
    eprintln!("kiln: downloading {file}{sized}");
    let watch = Watch::new(file);
    let started = Instant::now();
    let pointer = tokio::select! {
        result = repo.download_with_progress(file, watch.clone()) => {
            result.map_err(|e| download_error(host, file, e))?
        }
        () = watch.stalled(STALL_TIMEOUT) => {
            watch.bar.abandon();
            bail!(
                "{file}: no data from {host} for {}s; run the same command again to resume",
                STALL_TIMEOUT.as_secs()
            );
        }
    };
    watch.bar.finish_and_clear();
    // hf-hub returns a link in its snapshot folder to the blob it wrote: move the blob.
    let blob = std::fs::canonicalize(&pointer).with_context(|| {
        format!(
            "cannot find the download of {file} at {}",
            pointer.display()
        )
    })?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::rename(&blob, &target)
        .with_context(|| format!("cannot move {} to {}", blob.display(), target.display()))?;
    if pointer != blob {
        // The dangling link would make hf-hub think it has the file.
        let _ = std::fs::remove_file(&pointer);
    }
    let size = std::fs::metadata(&target)
        .with_context(|| format!("cannot read {}", target.display()))?
        .len();
    if let Some(want) = expected
        && want != size
    {
        bail!("{file}: downloaded {size} bytes, the hub lists {want}; run the command again");
    }
    tracing::debug!(
        file,
        bytes = size,
        ms = started.elapsed().as_millis() as u64,
        "downloaded"
    );
    Ok(Fetched::Written(size))
}

/// hf-hub's progress reports: drive the bar and feed the stall watchdog.
#[derive(Clone)]
struct Watch {
    bar: ProgressBar,
    /// When the last bytes came, in milliseconds since `start`.
    last: Arc<AtomicU64>,
    start: Instant,
}

impl Watch {
    fn new(file: &str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(file.to_string());
        Self {
            bar,
            last: Arc::new(AtomicU64::new(0)),
            start: Instant::now(),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Returns once no progress was reported for `limit`.
    async fn stalled(&self, limit: Duration) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            if self.start.elapsed().saturating_sub(last) >= limit {
                return;
            }
        }
    }
}

impl Progress for Watch {
    async fn init(&mut self, size: usize, _filename: &str) {
        self.bar.set_length(size as u64);
        self.touch();
    }

    async fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
        self.touch();
    }

    async fn finish(&mut self) {
        self.touch();
    }
}

/// Returns `cannot reach HOST: <innermost causes>`.
fn unreachable_hub(host: &str, error: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let mut causes: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !causes.iter().any(|c| c.contains(&text)) {
            causes.push(text);
        }
        next = e.source();
    }
    anyhow!("cannot reach {host}: {}", causes.join(": "))
}

/// Explains a failed hf-hub download.
fn download_error(host: &str, file: &str, error: ApiError) -> anyhow::Error {
    match &error {
        ApiError::RequestError(e) => match e.status() {
            Some(status) => anyhow!(
                "{file}: {host} answered HTTP {} (a gated repository needs HF_TOKEN)",
                status.as_u16()
            ),
            None => unreachable_hub(host, e).context(format!("cannot download {file}")),
        },
        ApiError::LockAcquisition(path) => anyhow!(
            "{file}: another download holds {}; wait for it or remove it",
            path.display()
        ),
        _ => anyhow::Error::new(error).context(format!("cannot download {file} from {host}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_checked() {
        for ok in [
            "stabilityai/sdxl-turbo",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "gpt2",
            "a.b/c_d-1",
        ] {
            check_repo_id(ok).unwrap();
        }
        for bad in ["", "a/b/c", "../x", "a/..", "a b/c", "/x", "x/", "-a/b"] {
            let e = check_repo_id(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn hosts_are_taken_from_endpoints() {
        assert_eq!(host_of("https://huggingface.co"), "huggingface.co");
        assert_eq!(host_of("http://127.0.0.1:8080/mirror"), "127.0.0.1:8080");
        assert_eq!(host_of("hf-mirror.com"), "hf-mirror.com");
    }

    #[test]
    fn an_unreachable_hub_is_reported_as_such_within_the_deadline() {
        // A port on this machine with nothing listening: refused at once, no traffic leaves.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let api = ApiBuilder::new()
            .with_cache_dir(out.path().join(STAGING))
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_token(None)
            .with_progress(false)
            .build()
            .unwrap();
        let repo = api.repo(Repo::model("stabilityai/sdxl-turbo".into()));
        let started = Instant::now();
        let e = runtime
            .block_on(listing(
                &repo,
                "127.0.0.1",
                "stabilityai/sdxl-turbo",
                "main",
            ))
            .unwrap_err();
        assert!(started.elapsed() < LISTING_TIMEOUT);
        assert!(e.to_string().starts_with("cannot reach 127.0.0.1: "), "{e}");
        let e = runtime
            .block_on(fetch_file(
                &repo,
                "127.0.0.1",
                MODEL_INDEX,
                Some(10),
                out.path(),
            ))
            .err()
            .expect("nothing listens");
        assert!(format!("{e:#}").contains("cannot reach 127.0.0.1"), "{e:#}");
    }

    #[test]
    fn files_already_complete_are_kept() {
        let out = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(out.path().join("unet")).unwrap();
        std::fs::write(out.path().join("unet/config.json"), b"{}").unwrap();
        let api = ApiBuilder::new()
            .with_cache_dir(out.path().join(STAGING))
            .with_endpoint("http://127.0.0.1:9".into())
            .with_progress(false)
            .build()
            .unwrap();
        let repo = api.repo(Repo::model("x/y".into()));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        // The right size: kept without any request.
        let kept = runtime
            .block_on(fetch_file(
                &repo,
                "h",
                "unet/config.json",
                Some(2),
                out.path(),
            ))
            .unwrap();
        assert!(matches!(kept, Fetched::Kept));
    }
}
