//! The Pub/Sub listener that wakes long-polling claims and watchers.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

/// Keeps a Pub/Sub connection subscribed to the farm's channels and bumps the
/// watch channels on every message; reconnects after failures.
pub(super) async fn listen(
    client: redis::Client,
    prefix: String,
    work: watch::Sender<u64>,
    events: watch::Sender<u64>,
) {
    let work_channel = format!("{prefix}:work");
    let events_channel = format!("{prefix}:events");
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&work_channel).await.is_ok()
                    && pubsub.subscribe(&events_channel).await.is_ok()
                {
                    // Anything published while we were away is covered by waking everyone now.
                    work.send_modify(|v| *v += 1);
                    events.send_modify(|v| *v += 1);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        if msg.get_channel_name() == work_channel {
                            work.send_modify(|v| *v += 1);
                        } else {
                            events.send_modify(|v| *v += 1);
                        }
                    }
                }
                tracing::warn!("Redis Pub/Sub connection lost; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the Redis Pub/Sub connection; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
