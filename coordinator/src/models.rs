//! What each model name means on the farm and who holds it: the summary that
//! `ListModels` answers (`kiln models`), built from the store's live workers
//! and pinned tasks with the farm's one model rule ([`kiln_proto::model`]).

use std::collections::BTreeMap;

use kiln_proto::ids::WorkerId;
use kiln_proto::model::HashHolders;

use crate::core::Core;
use crate::error::CoordinatorResult;
use crate::store::{LiveWorker, PinnedTasks, identities};

/// One model name on the farm.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSummary {
    /// The catalog name.
    pub name: String,
    /// The hashes live workers hold, the chosen one (what the name means)
    /// first; empty when no live worker holds the name.
    pub hashes: Vec<HashHolders>,
    /// Live workers with the model loaded.
    pub resident: Vec<WorkerId>,
    /// Tasks of running jobs waiting for a worker, whatever their pinned hash.
    pub queued: u32,
    /// Tasks of running jobs held by a worker.
    pub running: u32,
}

/// Joins what live workers hold with the tasks waiting for each model: every
/// name a live worker holds or a task needs, in name order.
pub fn summarize(live: &[LiveWorker], pins: &[PinnedTasks]) -> Vec<ModelSummary> {
    fn slot<'a>(out: &'a mut BTreeMap<String, ModelSummary>, name: &str) -> &'a mut ModelSummary {
        out.entry(name.to_string()).or_insert_with(|| ModelSummary {
            name: name.to_string(),
            hashes: Vec::new(),
            resident: Vec::new(),
            queued: 0,
            running: 0,
        })
    }
    let mut out: BTreeMap<String, ModelSummary> = BTreeMap::new();
    for identity in identities(live) {
        let s = slot(&mut out, &identity.name);
        s.resident = live
            .iter()
            .filter(|w| w.models.iter().any(|m| m.name == identity.name))
            .filter(|w| w.has_resident(&identity.name))
            .map(|w| w.id.clone())
            .collect();
        s.hashes = identity.hashes;
    }
    for pin in pins {
        let s = slot(&mut out, &pin.model);
        s.queued += pin.queued;
        s.running += pin.running;
    }
    out.into_values().collect()
}

/// Returns the farm's models, as `ListModels` answers.
pub async fn list(core: &Core) -> CoordinatorResult<Vec<ModelSummary>> {
    let live = core.store.live_workers().await?;
    let pins = core.store.pinned_tasks().await?;
    Ok(summarize(&live, &pins))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ModelInfo;

    fn live(id: &str, models: &[(&str, &str)], resident: &[&str]) -> LiveWorker {
        LiveWorker {
            id: WorkerId(id.into()),
            models: models
                .iter()
                .map(|(name, hash)| ModelInfo {
                    name: name.to_string(),
                    hash: hash.to_string(),
                })
                .collect(),
            resident: resident.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn each_name_lists_its_hashes_chosen_first_its_resident_workers_and_its_tasks() {
        let workers = [
            live("a", &[("tiny", "h1"), ("sd15", "s")], &["sd15"]),
            live("b", &[("tiny", "h2")], &[]),
            live("c", &[("tiny", "h2")], &["tiny"]),
        ];
        let pins = [
            PinnedTasks {
                model: "tiny".into(),
                hash: "h2".into(),
                queued: 3,
                running: 1,
            },
            PinnedTasks {
                model: "xl".into(),
                hash: "x".into(),
                queued: 2,
                running: 0,
            },
        ];
        let s = summarize(&workers, &pins);
        let names: Vec<&str> = s.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["sd15", "tiny", "xl"]);
        let tiny = &s[1];
        assert_eq!(tiny.hashes[0].hash, "h2", "two holders beat one");
        assert_eq!(tiny.hashes[0].workers.len(), 2);
        assert_eq!(tiny.hashes[1].hash, "h1");
        // b reports nothing loaded: its whole catalog counts as resident.
        assert_eq!(tiny.resident, [WorkerId("b".into()), WorkerId("c".into())]);
        assert_eq!((tiny.queued, tiny.running), (3, 1));
        assert_eq!(s[0].resident, [WorkerId("a".into())]);
        assert!(s[2].hashes.is_empty(), "no live worker holds xl");
        assert_eq!(s[2].queued, 2);
    }
}
