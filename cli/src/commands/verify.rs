//! `kiln verify JOB [--sample N]`: re-render items of a finished job on other
//! workers of its determinism class and compare the bytes.

use std::collections::HashMap;

use serde_json::json;

use crate::client::Farm;
use crate::commands::fetch::for_each_result;
use crate::commands::watch;

/// The verdict on one item.
struct Verdict {
    index: u32,
    file_name: String,
    identical: bool,
    detail: String,
}

/// Re-render items of a finished job on other workers of its determinism
/// class and report, per item, byte-identical or not (exit 0 only if all are).
#[derive(clap::Args, Debug)]
pub struct Verify {
    /// The job id.
    job: String,
    /// How many items to re-render, spread over the job (default: all).
    #[arg(long, default_value_t = 0)]
    sample: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Verify {
    /// Runs `kiln verify`; returns true when every sampled item re-rendered byte-identical.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        run(farm, &self.job, self.sample, self.json).await
    }
}

async fn run(farm: &Farm, job_id: &str, sample: u32, json_out: bool) -> anyhow::Result<bool> {
    let resp = farm
        .verify(job_id, sample)
        .await
        .map_err(|s| farm.explain(s))?;
    let mut verdicts: Vec<Verdict> = resp
        .skipped
        .iter()
        .map(|s| Verdict {
            index: s.index,
            file_name: String::new(),
            identical: false,
            detail: format!("not verified: {}", s.reason),
        })
        .collect();
    if let Some(job) = &resp.job {
        if !json_out {
            eprintln!(
                "re-rendering {} items as job {}",
                resp.original_index.len(),
                job.job_id
            );
        }
        let done = watch::follow(farm, &job.job_id, json_out).await?;
        let mut originals: HashMap<u32, (String, Vec<u8>)> = HashMap::new();
        for_each_result(farm, job_id, Vec::new(), |item| {
            if item.artifact.is_none() && !item.file_name.is_empty() {
                originals.insert(item.index, (item.file_name, item.png));
            }
            Ok(())
        })
        .await?;
        let mut renders: HashMap<u32, Vec<u8>> = HashMap::new();
        for_each_result(farm, &job.job_id, Vec::new(), |item| {
            if item.artifact.is_none() && !item.file_name.is_empty() {
                renders.insert(item.index, item.png);
            }
            Ok(())
        })
        .await?;
        for (v, o) in resp.original_index.iter().enumerate() {
            let original = originals.get(o);
            let render = renders.get(&(v as u32));
            let file_name = original.map(|(f, _)| f.clone()).unwrap_or_default();
            let verdict = match (original, render) {
                (Some((_, a)), Some(b)) => {
                    let (ha, hb) = (
                        kiln_domain::image::sha256_hex(a),
                        kiln_domain::image::sha256_hex(b),
                    );
                    if ha == hb {
                        Verdict {
                            index: *o,
                            file_name,
                            identical: true,
                            detail: "byte-identical".into(),
                        }
                    } else {
                        Verdict {
                            index: *o,
                            file_name,
                            identical: false,
                            detail: format!("DIFFERENT: stored sha256 {ha}, re-render {hb}"),
                        }
                    }
                }
                (_, None) => Verdict {
                    index: *o,
                    file_name,
                    identical: false,
                    detail: format!(
                        "not re-rendered: the verification job ended {}",
                        crate::format::job_state(done.state)
                    ),
                },
                (None, _) => Verdict {
                    index: *o,
                    file_name,
                    identical: false,
                    detail: "the original image is missing from the result store".into(),
                },
            };
            verdicts.push(verdict);
        }
    }
    verdicts.sort_by_key(|v| v.index);
    let all = !verdicts.is_empty() && verdicts.iter().all(|v| v.identical);
    if json_out {
        let items: Vec<_> = verdicts
            .iter()
            .map(|v| json!({"index": v.index, "file": v.file_name, "identical": v.identical, "detail": v.detail}))
            .collect();
        let verification = resp.job.as_ref().map(|j| j.job_id.clone());
        println!(
            "{}",
            json!({"job_id": job_id, "verification_job": verification, "all_identical": all, "items": items})
        );
    } else {
        for v in &verdicts {
            println!("item {:>5} {:<48} {}", v.index, v.file_name, v.detail);
        }
        let same = verdicts.iter().filter(|v| v.identical).count();
        println!(
            "{same} of {} items byte-identical{}",
            verdicts.len(),
            if all { "" } else { ": verification FAILED" }
        );
    }
    Ok(all)
}
