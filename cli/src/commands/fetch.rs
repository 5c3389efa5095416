//! `kiln fetch JOB --out DIR`: bring a job's images and manifest home,
//! skipping files already there with the right sha256.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_proto::pb;

use crate::client::{Farm, next_within};

/// Download a job's finished images and manifest; files already present are skipped.
#[derive(clap::Args, Debug)]
pub struct Fetch {
    /// The job id.
    job: String,
    /// Where the images and manifest.jsonl go.
    #[arg(long)]
    out: PathBuf,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

impl Fetch {
    /// Runs `kiln fetch`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        let report = fetch(farm, &self.job, &self.out).await?;
        if self.json {
            println!("{}", serde_json::to_value(&report)?);
        } else {
            println!("{}", summary_line(&report));
        }
        Ok(true)
    }
}

/// How long the result stream may stay silent (one image is read per message).
const IDLE: Duration = Duration::from_secs(120);

/// What a fetch did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FetchReport {
    /// Images written now.
    pub written: usize,
    /// Images already present with the right hash.
    pub kept: usize,
    /// Items that ended without an image (failed or cancelled).
    pub without_image: usize,
    /// Items not finished yet.
    pub pending: usize,
    /// Job-level files written (series contact sheets).
    pub artifacts: usize,
    /// Where the files are.
    pub out: PathBuf,
}

/// Fetches every finished item of `job_id` into `out`.
pub async fn fetch(farm: &Farm, job_id: &str, out: &Path) -> anyhow::Result<FetchReport> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let job = farm.job(job_id, true).await.map_err(|s| farm.explain(s))?;
    let total = job
        .job
        .as_ref()
        .and_then(|j| j.counts)
        .map_or(0, |c| c.total) as usize;
    let mut held: Vec<pb::HeldItem> = Vec::new();
    for t in job.tasks.iter().filter(|t| !t.sha256.is_empty()) {
        let path = out.join(safe_name(&t.file_name)?);
        if let Ok(bytes) = std::fs::read(&path)
            && kiln_domain::image::sha256_hex(&bytes) == t.sha256
        {
            held.push(pb::HeldItem {
                index: t.index,
                sha256: t.sha256.clone(),
            });
        }
    }
    let mut report = FetchReport {
        out: out.to_path_buf(),
        ..Default::default()
    };
    let mut lines = BTreeMap::new();
    for_each_result(farm, job_id, held, |item| {
        if let Some(artifact) = &item.artifact {
            let path = out.join(safe_path(artifact)?);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            write_atomic(&path, &item.png)?;
            report.artifacts += 1;
            return Ok(());
        }
        lines.insert(item.index, item.manifest_line.clone());
        if item.file_name.is_empty() {
            report.without_image += 1;
            return Ok(());
        }
        if item.png.is_empty() {
            report.kept += 1;
            return Ok(());
        }
        let digest = kiln_domain::image::sha256_hex(&item.png);
        if digest != item.sha256 {
            bail!(
                "item {} ({}): the received bytes hash to {digest}, the coordinator says {}; fetch again",
                item.index,
                item.file_name,
                item.sha256
            );
        }
        write_atomic(&out.join(safe_name(&item.file_name)?), &item.png)?;
        report.written += 1;
        Ok(())
    })
    .await?;
    report.pending = total.saturating_sub(lines.len());
    let mut manifest = String::new();
    for line in lines.values() {
        manifest.push_str(line);
        manifest.push('\n');
    }
    write_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;
    Ok(report)
}

/// One message of a job's result stream.
pub struct ResultItem {
    /// The item's index (0 for artifacts).
    pub index: u32,
    /// Its file name; empty for items without an image and for artifacts.
    pub file_name: String,
    /// The sha256 the coordinator recorded.
    pub sha256: String,
    /// Its manifest line.
    pub manifest_line: String,
    /// The bytes as the result store holds them now (empty when held).
    pub png: Vec<u8>,
    /// For a job-level file: its path in the job's folder.
    pub artifact: Option<String>,
}

/// Streams a job's finished items and artifacts into `each`, in order.
pub async fn for_each_result(
    farm: &Farm,
    job_id: &str,
    held: Vec<pb::HeldItem>,
    mut each: impl FnMut(ResultItem) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stream = farm
        .fetch(pb::FetchResultsRequest {
            job_id: job_id.to_string(),
            from_index: 0,
            held,
        })
        .await
        .map_err(|s| farm.explain(s))?;
    while let Some(m) = next_within(&mut stream, IDLE)
        .await
        .map_err(|s| farm.explain(s))?
    {
        each(ResultItem {
            index: m.index,
            file_name: m.file_name,
            sha256: m.sha256,
            manifest_line: m.manifest_line,
            png: m.png,
            artifact: (!m.artifact.is_empty()).then_some(m.artifact),
        })?;
    }
    Ok(())
}

/// Refuses artifact paths that could escape the output folder.
fn safe_path(path: &str) -> anyhow::Result<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.split('/') {
        out.push(safe_name(part)?);
    }
    Ok(out)
}

/// Refuses file names that could escape the output folder.
fn safe_name(name: &str) -> anyhow::Result<&str> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("the coordinator sent an unsafe file name {name:?}");
    }
    Ok(name)
}

/// Writes a file through a temporary name, so a crash never leaves half a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Returns the human summary of a fetch.
pub fn summary_line(report: &FetchReport) -> String {
    let mut s = format!(
        "{} images written, {} already present, in {}",
        report.written,
        report.kept,
        report.out.display()
    );
    if report.without_image > 0 {
        s.push_str(&format!(
            "; {} items ended without an image (see manifest.jsonl)",
            report.without_image
        ));
    }
    if report.pending > 0 {
        s.push_str(&format!(
            "; {} items still running: fetch again later",
            report.pending
        ));
    }
    s
}
