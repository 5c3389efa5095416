//! `kiln watch JOB`: follow a job with a progress bar until it ends; with
//! `--previews DIR`, keep the latest live preview of each running task as
//! `DIR/{index:05}.png`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_proto::connect::is_transient;
use kiln_proto::pb::{self, EventKind, JobState};

use crate::client::{Farm, next_within};
use crate::format::{job_json, job_state};

/// Follow a job with a progress bar until it ends (exit 0 only if every item succeeded).
#[derive(clap::Args, Debug)]
pub struct Watch {
    /// The job id.
    job: String,
    /// Print the final job as JSON.
    #[arg(long)]
    json: bool,
    /// Write the latest live preview of each running task (64 px wide PNG)
    /// as DIR/NNNNN.png (the item's index), replaced as newer ones arrive.
    #[arg(long, value_name = "DIR")]
    previews: Option<PathBuf>,
}

impl Watch {
    /// Runs `kiln watch`; returns true when every item succeeded.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        if let Some(dir) = &self.previews {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--previews: cannot create {}", dir.display()))?;
        }
        let done = follow_with(farm, &self.job, self.json, self.previews.as_deref()).await?;
        if self.json {
            println!("{}", job_json(&done));
        } else {
            println!("{}", summary_line(&done));
        }
        Ok(done.state == JobState::Completed as i32)
    }
}

/// The coordinator sends progress every second; this much silence means the
/// connection is gone and the watch reconnects from its cursor.
const IDLE: Duration = Duration::from_secs(30);
/// Reconnection attempts in a row before giving up (about two minutes).
const MAX_RECONNECTS: u32 = 30;

/// Follows a job until it ends and returns its final summary. Progress goes
/// to stderr: a bar on a terminal, one line per finished item otherwise.
pub async fn follow(farm: &Farm, job_id: &str, quiet: bool) -> anyhow::Result<pb::JobSummary> {
    follow_with(farm, job_id, quiet, None).await
}

/// [`follow`], writing live previews into `previews` when given.
async fn follow_with(
    farm: &Farm,
    job_id: &str,
    quiet: bool,
    previews: Option<&Path>,
) -> anyhow::Result<pb::JobSummary> {
    let tty = std::io::stderr().is_terminal() && !quiet;
    let bar = if tty {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut cursor = 0u64;
    let mut failures = 0u32;
    loop {
        let mut stream = match farm.watch(job_id, cursor, previews.is_some()).await {
            Ok(s) => s,
            Err(status) if is_transient(&status) && failures < MAX_RECONNECTS => {
                failures += 1;
                tokio::time::sleep(
                    Duration::from_secs(1).min(Duration::from_millis(250) * failures),
                )
                .await;
                continue;
            }
            Err(status) => {
                bar.abandon();
                return Err(farm.explain(status));
            }
        };
        loop {
            match next_within(&mut stream, IDLE).await {
                Ok(Some(msg)) => {
                    failures = 0;
                    if let Some(job) = &msg.job {
                        let c = job.counts.unwrap_or_default();
                        bar.set_length(u64::from(c.total));
                        bar.set_position(u64::from(c.completed + c.failed + c.cancelled));
                        bar.set_message(format!("{} running", c.leased));
                    }
                    if let Some(e) = &msg.event {
                        cursor = e.seq;
                        report_event(&bar, tty, quiet, e, msg.job.as_ref());
                    }
                    if let Some(dir) = previews {
                        for p in &msg.previews {
                            write_preview(dir, p)?;
                        }
                    }
                }
                Ok(None) => break,
                Err(status) if is_transient(&status) => {
                    failures += 1;
                    if failures >= MAX_RECONNECTS {
                        bar.abandon();
                        return Err(farm.explain(status));
                    }
                    break;
                }
                Err(status) => {
                    bar.abandon();
                    return Err(farm.explain(status));
                }
            }
        }
        // The stream ended: the job finished, or the coordinator went away.
        match farm.job(job_id, false).await {
            Ok(resp) => {
                if let Some(job) = resp.job
                    && job.state != JobState::Running as i32
                {
                    bar.finish_and_clear();
                    return Ok(job);
                }
            }
            Err(status) if is_transient(&status) && failures < MAX_RECONNECTS => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(status) => {
                bar.abandon();
                return Err(farm.explain(status));
            }
        }
    }
}

/// Writes a preview as `dir/{index:05}.png`, through a temporary file and a
/// rename, so a reader never sees half a picture.
fn write_preview(dir: &Path, p: &pb::TaskPreview) -> anyhow::Result<()> {
    let path = dir.join(format!("{:05}.png", p.index));
    let partial = dir.join(format!(".{:05}.png.partial", p.index));
    std::fs::write(&partial, &p.png)
        .and_then(|()| std::fs::rename(&partial, &path))
        .with_context(|| format!("--previews: cannot write {}", path.display()))
}

/// Shows one event: failures always, every finished item when not on a terminal.
fn report_event(
    bar: &ProgressBar,
    tty: bool,
    quiet: bool,
    e: &pb::JobEvent,
    job: Option<&pb::JobSummary>,
) {
    if quiet {
        return;
    }
    let kind = EventKind::try_from(e.kind).unwrap_or(EventKind::Unspecified);
    let done = job
        .and_then(|j| j.counts)
        .map(|c| format!("{}/{}", c.completed + c.failed + c.cancelled, c.total))
        .unwrap_or_default();
    let line = match kind {
        EventKind::Completed if !tty => {
            format!("[{done}] item {} done by {}", e.index, e.worker_id)
        }
        EventKind::Failed => format!(
            "item {} failed{} ({:?}): {}",
            e.index,
            // A task failed without a lease (its model unavailable, its anchor failed) names no worker.
            if e.worker_id.is_empty() {
                String::new()
            } else {
                format!(" on {}", e.worker_id)
            },
            pb::FaultClass::try_from(e.fault).unwrap_or(pb::FaultClass::Unspecified),
            e.message
        ),
        EventKind::Expired => format!(
            "item {}: worker {} lost its lease (epoch {}); the task runs again",
            e.index, e.worker_id, e.epoch
        ),
        EventKind::Paused => "job paused: nothing new of it is leased".to_string(),
        EventKind::Resumed => "job resumed".to_string(),
        EventKind::Reprioritized => format!("job {}", e.message),
        EventKind::JobFinished if !tty => {
            format!(
                "job finished: {}",
                job.map(|j| job_state(j.state)).unwrap_or("?")
            )
        }
        _ => return,
    };
    if tty {
        bar.println(line);
    } else {
        eprintln!("{line}");
    }
}

/// Returns the one-line summary of a finished job.
pub fn summary_line(job: &pb::JobSummary) -> String {
    let c = job.counts.unwrap_or_default();
    format!(
        "job {} {}: {}/{} images, {} failed, {} cancelled",
        job.job_id,
        job_state(job.state),
        c.completed,
        c.total,
        c.failed,
        c.cancelled
    )
}
