//! Verification jobs: re-render items of a finished job, on other workers of
//! the same determinism class, so a client can compare bytes.

use std::collections::BTreeMap;

use bytes::Bytes;
use kiln_domain::image::sha256_hex;
use kiln_proto::ids::{JobId, TaskId};

use crate::core::Core;
use crate::error::{CoordinatorError, CoordinatorResult};
use crate::store::{JobRecord, NewJob, NewTask, TaskRecord};

/// Picks `sample` of `n` positions spread evenly (all when `sample` is 0 or ≥ n).
fn spread(n: usize, sample: usize) -> Vec<usize> {
    if sample == 0 || sample >= n {
        return (0..n).collect();
    }
    (0..sample).map(|i| i * n / sample).collect()
}

/// What a verification request produced.
#[derive(Debug)]
pub struct Verification {
    /// The verification job; `None` when no sampled item could be re-rendered.
    pub job: Option<JobRecord>,
    /// Index in the verification job -> index in the original job.
    pub original_index: Vec<u32>,
    /// Sampled items that cannot be re-rendered, and why.
    pub skipped: Vec<Skipped>,
}

/// A sampled item a verification leaves out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Its index in the original job.
    pub index: u32,
    /// Why it cannot be re-rendered.
    pub reason: String,
}

/// Creates the verification job of a finished job.
///
/// # Errors
/// [`CoordinatorError::StillRunning`] for a running job and
/// [`CoordinatorError::NothingToVerify`] for one without images.
pub async fn verify(core: &Core, id: JobId, sample: usize) -> CoordinatorResult<Verification> {
    let job = core.store.job(id).await?;
    if !job.is_finished() {
        return Err(CoordinatorError::StillRunning(id));
    }
    let all = core.store.tasks(id).await?;
    let done: Vec<&TaskRecord> = all.iter().filter(|t| t.result.is_some()).collect();
    if done.is_empty() {
        return Err(CoordinatorError::NothingToVerify(id));
    }
    let sampled: Vec<&TaskRecord> = spread(done.len(), sample)
        .into_iter()
        .map(|i| done[i])
        .collect();
    // Verify on the class most of the sample was rendered on.
    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &sampled {
        if let Some(r) = &t.result {
            *classes.entry(r.class.as_str()).or_default() += 1;
        }
    }
    let class = classes
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(c, _)| c.to_string())
        .unwrap_or_default();
    let mut tasks = Vec::new();
    let mut blobs: Vec<(String, Bytes)> = Vec::new();
    let mut original_index = Vec::new();
    let mut skipped = Vec::new();
    for t in sampled {
        let Some(result) = &t.result else { continue };
        if result.class != class {
            skipped.push(Skipped {
                index: t.index,
                reason: format!(
                    "rendered on class {}, and this verification runs on {class}",
                    result.class
                ),
            });
            continue;
        }
        match inputs(core, id, t, &all).await? {
            Ok(found) => {
                for (sha, data) in found {
                    if !blobs.iter().any(|(s, _)| *s == sha) {
                        blobs.push((sha, data));
                    }
                }
            }
            Err(reason) => {
                skipped.push(Skipped {
                    index: t.index,
                    reason,
                });
                continue;
            }
        }
        let index = tasks.len() as u32;
        tasks.push(NewTask {
            id: TaskId::new(),
            index,
            recipe: t.recipe.clone(),
            file_name: t.file_name.clone(),
            series: None,
            // Another worker of the class, when there is one.
            avoid: t
                .attempts
                .last()
                .map(|a| a.worker.clone())
                .into_iter()
                .collect(),
        });
        original_index.push(t.index);
    }
    if tasks.is_empty() {
        return Ok(Verification {
            job: None,
            original_index,
            skipped,
        });
    }
    let new = NewJob {
        id: JobId::new(),
        name: format!("verify {id}"),
        project: job.project.clone(),
        priority: job.priority,
        idempotency_key: None,
        tasks,
        blobs,
        pin_class: true,
        class: Some(class),
        // A verification must render, never reuse.
        dedupe: false,
        verify_of: Some(id),
        traceparent: kiln_proto::telemetry::traceparent(&tracing::Span::current()),
        // `kiln verify` waits for its answer itself: no webhook.
        notify: Vec::new(),
        submitted_by: None,
    };
    let (created, _) = core.store.create_job(new).await?;
    tracing::info!(job = %id, verification = %created.id, items = original_index.len(), "verification submitted");
    Ok(Verification {
        job: Some(created),
        original_index,
        skipped,
    })
}

/// Gathers the images a task's recipe refers to, checked against their
/// hashes; Err(reason) when one is gone or was modified.
async fn inputs(
    core: &Core,
    job: JobId,
    task: &TaskRecord,
    all: &[TaskRecord],
) -> CoordinatorResult<Result<Vec<(String, Bytes)>, String>> {
    let refs: Vec<String> = task.recipe.images();
    let mut found = core.store.blobs(job, &refs).await?;
    for sha in &refs {
        if found.iter().any(|(s, _)| s == sha) {
            continue;
        }
        let Some(source) = all
            .iter()
            .find(|t| t.result.as_ref().is_some_and(|r| &r.sha256 == sha))
        else {
            return Ok(Err(format!("its input image {sha} is no longer available")));
        };
        let Some(r) = &source.result else { continue };
        let folder = core.folder(job).await?;
        let data = core
            .results
            .read_image(&folder, &source.file_name, &r.object)
            .await?;
        if sha256_hex(&data) != *sha {
            return Ok(Err(format!(
                "its input image {} was modified in the result store",
                source.file_name
            )));
        }
        found.push((sha.clone(), data));
    }
    Ok(Ok(found))
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn samples_spread_over_the_job() {
        assert_eq!(spread(10, 0), (0..10).collect::<Vec<_>>());
        assert_eq!(spread(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(spread(3, 8), vec![0, 1, 2]);
    }
}
