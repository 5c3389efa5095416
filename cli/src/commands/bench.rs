//! `kiln bench ...`: benchmarks as commands, never as timed tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_coordinator::store::{MemoryStore, RedisConfig, RedisStore, Store};
use kiln_proto::pb::{self, FieldValue, field_value::Kind};
use kiln_worker::render::SimRenderer;
use serde_json::json;

use crate::commands::watch;
use crate::embedded::EmbeddedFarm;

/// Measures the coordinator's dispatch rate: `workers` sim workers with
/// 0 ms steps run a job of `tasks` one-step items through the embedded farm
/// (memory store, real gRPC on loopback); prints lease + complete cycles per second.
pub async fn dispatch(
    workers: u32,
    tasks: u32,
    store_url: Option<&str>,
    json_out: bool,
) -> anyhow::Result<()> {
    if workers == 0 || tasks == 0 {
        bail!("--workers and --tasks must be at least 1");
    }
    let renderer = Arc::new(SimRenderer::new(&["sim".into()], Duration::ZERO));
    let redis = match store_url {
        Some(url) => Some(Arc::new(
            RedisStore::connect(&RedisConfig {
                url: url.to_string(),
                name: format!("bench-{}", uuid::Uuid::new_v4().simple()),
                retention: Duration::from_secs(600),
            })
            .await
            .with_context(|| format!("--store {url}"))?,
        )),
        None => None,
    };
    let store: Arc<dyn Store> = match &redis {
        Some(r) => r.clone(),
        None => Arc::new(MemoryStore::new()),
    };
    let farm = EmbeddedFarm::start_with(store, renderer, workers).await?;
    let trips_before = redis.as_ref().map_or(0, |r| r.round_trips());
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
    let trips = redis.as_ref().map(|r| r.round_trips() - trips_before);
    farm.stop().await?;
    let completed = done.counts.unwrap_or_default().completed;
    let rate = f64::from(completed) / (elapsed - submitted).as_secs_f64();
    let per_task = trips.map(|t| t as f64 / f64::from(completed.max(1)));
    let store_name = if redis.is_some() { "redis" } else { "memory" };
    if json_out {
        println!(
            "{}",
            json!({"store": store_name, "workers": workers, "tasks": tasks, "completed": completed,
                   "submit_s": submitted.as_secs_f64(), "total_s": elapsed.as_secs_f64(),
                   "cycles_per_s": rate, "redis_round_trips_per_task": per_task})
        );
    } else {
        let trips = per_task
            .map(|p| format!(", {p:.1} Redis round trips per task"))
            .unwrap_or_default();
        println!(
            "{store_name} store: {completed}/{tasks} tasks by {workers} sim workers: submit {:.2} s, dispatch {:.2} s, {rate:.0} lease+complete cycles/s{trips}",
            submitted.as_secs_f64(),
            (elapsed - submitted).as_secs_f64()
        );
    }
    Ok(())
}
