//! `kiln usage`: images, render time and failed attempts per project and
//! model, from the coordinator's per-day (UTC) counters.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::client::Farm;
use crate::format::{table, time};

/// Show images, render seconds and failed attempts per project and model.
#[derive(clap::Args, Debug)]
pub struct Usage {
    /// Only this project.
    #[arg(long)]
    project: Option<String>,
    /// Only the last DURATION ("7d", "24h"); counted in whole UTC days, from
    /// the start of the day it reaches into.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Usage {
    /// Runs `kiln usage`.
    pub async fn run(self, farm: &Farm) -> anyhow::Result<bool> {
        let since_ms = match self.since {
            Some(d) => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
                now.saturating_sub(d).as_millis().max(1) as i64
            }
            None => 0,
        };
        let project = self.project.as_deref().unwrap_or("");
        let r = farm
            .usage(project, since_ms)
            .await
            .map_err(|s| farm.explain(s))?;
        if self.json {
            let rows: Vec<Value> = r
                .usage
                .iter()
                .map(|u| {
                    json!({
                        "project": u.project, "model": u.model, "images": u.images,
                        "render_seconds": u.render_seconds, "failed_attempts": u.failed_attempts,
                    })
                })
                .collect();
            let from = if r.from_ms > 0 {
                Value::from(time(r.from_ms))
            } else {
                Value::Null
            };
            println!("{}", json!({"from": from, "usage": rows}));
            return Ok(true);
        }
        let rows: Vec<Vec<String>> = r
            .usage
            .iter()
            .map(|u| {
                vec![
                    u.project.clone(),
                    u.model.clone(),
                    u.images.to_string(),
                    format!("{:.1}", u.render_seconds),
                    u.failed_attempts.to_string(),
                ]
            })
            .collect();
        if r.from_ms > 0 {
            println!("since {}", time(r.from_ms));
        }
        println!(
            "{}",
            table(
                &["PROJECT", "MODEL", "IMAGES", "RENDER_S", "FAILED_ATTEMPTS"],
                &rows
            )
        );
        Ok(true)
    }
}
