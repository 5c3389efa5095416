//! `kiln bench ...`: benchmarks as commands, never as timed tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_proto::pb::{self, FieldValue, field_value::Kind};
use kiln_worker::render::SimRenderer;
use serde_json::json;

use crate::commands::watch;
use crate::embedded::EmbeddedFarm;

/// Measures the coordinator's dispatch rate: `workers` sim workers with
/// 0 ms steps run a job of `tasks` one-step items through the embedded farm
/// (memory store, real gRPC on loopback); prints lease + complete cycles per second.
pub async fn dispatch(workers: u32, tasks: u32, json_out: bool) -> anyhow::Result<()> {
    if workers == 0 || tasks == 0 {
        bail!("--workers and --tasks must be at least 1");
    }
    let renderer = Arc::new(SimRenderer::new(&["sim".into()], Duration::ZERO));
    let farm = EmbeddedFarm::start(renderer, workers).await?;
    let spec = pb::JobSpec {
        name: "bench-dispatch".into(),
        defaults: Some(pb::RecipeFields {
            model: Some("sim".into()),
            prompt: Some("benchmark".into()),
            steps: Some(1),
            width: Some(64),
            height: Some(64),
            ..Default::default()
        }),
        sweep: vec![pb::SweepAxis {
            field: "seed".into(),
            values: (0..i64::from(tasks))
                .map(|s| FieldValue {
                    kind: Some(Kind::Integer(s)),
                })
                .collect(),
            zip: String::new(),
        }],
        ..Default::default()
    };
    let started = Instant::now();
    let resp = farm
        .farm
        .submit(pb::SubmitJobRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .map_err(|s| farm.farm.explain(s))?;
    let submitted = started.elapsed();
    let job = resp.job.context("no job")?;
    let done = watch::follow(&farm.farm, &job.job_id, true).await?;
    let elapsed = started.elapsed();
    farm.stop().await?;
    let completed = done.counts.unwrap_or_default().completed;
    let rate = f64::from(completed) / (elapsed - submitted).as_secs_f64();
    if json_out {
        println!(
            "{}",
            json!({"workers": workers, "tasks": tasks, "completed": completed,
                   "submit_s": submitted.as_secs_f64(), "total_s": elapsed.as_secs_f64(),
                   "cycles_per_s": rate})
        );
    } else {
        println!(
            "{completed}/{tasks} tasks by {workers} sim workers: submit {:.2} s, dispatch {:.2} s, {rate:.0} lease+complete cycles/s",
            submitted.as_secs_f64(),
            (elapsed - submitted).as_secs_f64()
        );
    }
    Ok(())
}
