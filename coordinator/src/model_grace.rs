//! A job never waits in silence for a model: queued tasks whose pinned
//! (model, hash) no live worker has held for `--model-grace` fail with an
//! error that says so.
//!
//! Every coordinator replica runs [`run`]. Each remembers since when it has
//! seen every pinned hash without a live holder; when that passes the grace,
//! it asks the store to fail the tasks ([`Store::fail_unheld`]), which checks
//! again atomically that no live worker holds the hash, so a worker that
//! registered in between saves them, and which is idempotent, so replicas
//! doing it at once fail each task once.
//!
//! [`Store::fail_unheld`]: crate::store::Store::fail_unheld

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::error::quote;
use kiln_proto::model::{ModelIdentity, short_hash};
use tokio::time::{Instant, MissedTickBehavior};

use crate::core::Core;
use crate::store::StoreResult;

/// A pinned (model, hash).
type Pin = (String, String);

/// Checks the pinned hashes of queued tasks every `reap_interval` until shutdown.
pub async fn run(core: Arc<Core>) {
    let mut tick = tokio::time::interval(core.config.reap_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut unheld_since: HashMap<Pin, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = core.shutdown.cancelled() => return,
        }
        if let Err(e) = check(&core, &mut unheld_since).await {
            tracing::warn!(error = %e, "checking the models of queued tasks failed; retrying at the next tick");
        }
    }
}

/// One pass: notes the pins without a live holder and fails the tasks of
/// those unheld for longer than the grace.
async fn check(core: &Core, unheld_since: &mut HashMap<Pin, Instant>) -> StoreResult<()> {
    let pins = core.store.pinned_tasks().await?;
    let identities = core.store.models().await?;
    let now = Instant::now();
    let grace = core.config.model_grace;
    let mut unheld: HashMap<Pin, Instant> = HashMap::new();
    for pin in pins.iter().filter(|p| p.queued > 0) {
        let identity = identities.iter().find(|m| m.name == pin.model);
        if identity.is_some_and(|m| m.is_held(&pin.hash)) {
            continue;
        }
        let key = (pin.model.clone(), pin.hash.clone());
        let since = unheld_since.get(&key).copied().unwrap_or(now);
        unheld.insert(key, since);
        if now.duration_since(since) < grace {
            continue;
        }
        let message = unheld_message(&pin.model, &pin.hash, grace, identity);
        let done = core
            .store
            .fail_unheld(&pin.model, &pin.hash, &message)
            .await?;
        if done.failed > 0 {
            tracing::warn!(model = %pin.model, hash = %short_hash(&pin.hash), tasks = done.failed, "{message}");
        }
        for job in done.finished {
            core.finalize(job.id).await;
        }
    }
    *unheld_since = unheld;
    Ok(())
}

/// The error of a task failed for want of its model: the model, the pinned
/// hash (12 characters) and what live workers hold instead.
pub fn unheld_message(
    model: &str,
    hash: &str,
    grace: Duration,
    identity: Option<&ModelIdentity>,
) -> String {
    let pinned = if hash.is_empty() {
        "under any hash".to_string()
    } else {
        format!("at its pinned hash {}", short_hash(hash))
    };
    let instead = match identity {
        Some(m) => format!("live workers hold it at {} instead", m.holdings()),
        None => "no live worker holds it at any hash".to_string(),
    };
    format!(
        "no live worker held model {} {pinned} for --model-grace ({}): {instead}",
        quote(model),
        humantime::format_duration(grace)
    )
}

#[cfg(test)]
mod tests {
    use kiln_proto::ids::WorkerId;
    use kiln_proto::model::identify;

    use super::*;

    #[test]
    fn the_message_names_the_model_the_pinned_hash_and_what_live_workers_hold() {
        let w = WorkerId("w1".into());
        let ids = identify([(&w, "tiny", "abc123def4567890abc")]);
        let m = unheld_message(
            "tiny",
            "0a1b2c3d4e5f60718293",
            Duration::from_secs(15),
            ids.first(),
        );
        assert_eq!(
            m,
            "no live worker held model \"tiny\" at its pinned hash 0a1b2c3d4e5f for --model-grace (15s): live workers hold it at abc123def456 (1 worker) instead"
        );
        let none = unheld_message("tiny", "0a1b2c3d4e5f60718293", Duration::from_secs(2), None);
        assert!(
            none.ends_with("(2s): no live worker holds it at any hash"),
            "{none}"
        );
    }
}
