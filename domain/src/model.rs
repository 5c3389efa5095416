//! What a model name means on a farm: the one rule that turns the hashes live
//! workers announce for a name into the hash the farm pins jobs to.
//!
//! **The rule.** Only live workers vote (the store decides who is live:
//! registered, not draining, heard from recently). For each model name, the
//! hash held by the most of them is the name's meaning; a tie goes to the
//! hash that sorts first (byte order of the hex text), so every coordinator
//! and both stores choose the same hash from the same workers. The other
//! hashes disagree: workers holding them get no task pinned to the chosen
//! hash, and `kiln workers` / `kiln models` mark them. A drained, lost or
//! expired worker therefore never changes what a name means.

use std::collections::BTreeMap;

use crate::ids::WorkerId;

/// Characters of a model hash shown in messages and tables.
pub const SHORT_HASH: usize = 12;

/// Returns the first [`SHORT_HASH`] characters of a hash, for people.
pub fn short_hash(hash: &str) -> &str {
    match hash.char_indices().nth(SHORT_HASH) {
        Some((end, _)) => &hash[..end],
        None => hash,
    }
}

/// One hash of a model name and the live workers that hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashHolders {
    /// The content hash.
    pub hash: String,
    /// The live workers holding the name under this hash, sorted.
    pub workers: Vec<WorkerId>,
}

/// What live workers make of one model name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIdentity {
    /// The catalog name.
    pub name: String,
    /// Every hash live workers hold for the name, the chosen one first, then
    /// by the rule's order (most holders, then hash order). Never empty.
    pub hashes: Vec<HashHolders>,
}

impl ModelIdentity {
    /// Returns the hash the name means: the one jobs are pinned to.
    pub fn chosen(&self) -> &str {
        self.hashes.first().map_or("", |h| h.hash.as_str())
    }

    /// Returns the hashes that disagree with the chosen one.
    pub fn disagreeing(&self) -> &[HashHolders] {
        self.hashes.get(1..).unwrap_or_default()
    }

    /// Returns true when a live worker holds the name under `hash`; a task
    /// pinned to no hash (`""`) is held by any of them.
    pub fn is_held(&self, hash: &str) -> bool {
        hash.is_empty() || self.hashes.iter().any(|h| h.hash == hash)
    }

    /// Describes what live workers hold, for a message: `abc123def456 (2
    /// workers), 0a1b2c3d4e5f (1 worker)`.
    pub fn holdings(&self) -> String {
        self.hashes
            .iter()
            .map(|h| {
                let n = h.workers.len();
                format!(
                    "{} ({n} worker{})",
                    short_hash(&h.hash),
                    if n == 1 { "" } else { "s" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Applies the rule to what live workers hold, given as (worker, model
/// name, hash) for every model of every live worker; returns one identity
/// per name, in name order. The caller passes live workers only.
pub fn identify<'a>(
    holdings: impl IntoIterator<Item = (&'a WorkerId, &'a str, &'a str)>,
) -> Vec<ModelIdentity> {
    let mut by_name: BTreeMap<&str, BTreeMap<&str, Vec<WorkerId>>> = BTreeMap::new();
    for (worker, name, hash) in holdings {
        by_name
            .entry(name)
            .or_default()
            .entry(hash)
            .or_default()
            .push(worker.clone());
    }
    by_name
        .into_iter()
        .map(|(name, hashes)| {
            let mut hashes: Vec<HashHolders> = hashes
                .into_iter()
                .map(|(hash, mut workers)| {
                    workers.sort();
                    workers.dedup();
                    HashHolders {
                        hash: hash.to_string(),
                        workers,
                    }
                })
                .collect();
            // Most holders first; the BTreeMap gave hash order, and the sort
            // is stable, so a tie keeps the hash that sorts first.
            hashes.sort_by_key(|h| std::cmp::Reverse(h.workers.len()));
            ModelIdentity {
                name: name.to_string(),
                hashes,
            }
        })
        .collect()
}

/// Returns what each name means that no live worker holds any more: the
/// hash of the worker that announced it most recently, given as (that
/// worker's last call in Unix milliseconds, model name, hash) for every model
/// of every worker that was not drained; a tie goes to the hash that sorts
/// first. A farm scaled to zero thus keeps the meaning its last workers gave
/// a name, and admission can queue work for a pool that is not running yet.
/// It never overrides [`identify`]: while a live worker holds a name, live
/// workers alone decide what it means.
pub fn last_meanings<'a>(
    holdings: impl IntoIterator<Item = (i64, &'a str, &'a str)>,
) -> BTreeMap<String, String> {
    let mut last: BTreeMap<&str, (i64, &str)> = BTreeMap::new();
    for (seen, name, hash) in holdings {
        let newer = last
            .get(name)
            .is_none_or(|&(s, h)| seen > s || (seen == s && hash < h));
        if newer {
            last.insert(name, (seen, hash));
        }
    }
    last.into_iter()
        .map(|(name, (_, hash))| (name.to_string(), hash.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_no_live_worker_holds_means_what_its_last_holder_held() {
        let last = last_meanings([
            (100, "tiny", "old"),
            (300, "tiny", "new"),
            (200, "tiny", "older-but-many"),
            (50, "xl", "b"),
            (50, "xl", "a"),
        ]);
        assert_eq!(last.get("tiny").map(String::as_str), Some("new"));
        assert_eq!(
            last.get("xl").map(String::as_str),
            Some("a"),
            "a tie goes to the hash that sorts first"
        );
        assert!(last_meanings([]).is_empty());
    }

    fn w(id: &str) -> WorkerId {
        WorkerId(id.to_string())
    }

    #[test]
    fn the_hash_most_live_workers_hold_is_chosen() {
        let (a, b, c) = (w("a"), w("b"), w("c"));
        let ids = identify([
            (&a, "tiny", "ffff"),
            (&b, "tiny", "aaaa"),
            (&c, "tiny", "ffff"),
            (&a, "sd15", "1234"),
        ]);
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0].name, "sd15");
        assert_eq!(ids[0].chosen(), "1234");
        let tiny = &ids[1];
        assert_eq!(tiny.chosen(), "ffff", "two holders beat one");
        assert_eq!(tiny.hashes[0].workers, vec![a, c]);
        assert_eq!(tiny.disagreeing().len(), 1);
        assert_eq!(tiny.disagreeing()[0].hash, "aaaa");
        assert_eq!(tiny.disagreeing()[0].workers, vec![b]);
        assert!(tiny.is_held("aaaa") && !tiny.is_held("0000"));
        assert!(tiny.is_held(""), "a task pinned to no hash takes any");
    }

    #[test]
    fn a_tie_goes_to_the_hash_that_sorts_first_whatever_the_order_of_workers() {
        let (a, b) = (w("a"), w("b"));
        let one = identify([(&a, "tiny", "bbbb"), (&b, "tiny", "aaaa")]);
        let other = identify([(&b, "tiny", "aaaa"), (&a, "tiny", "bbbb")]);
        assert_eq!(one, other);
        assert_eq!(one[0].chosen(), "aaaa");
        assert_eq!(one[0].disagreeing()[0].hash, "bbbb");
    }

    #[test]
    fn no_live_worker_means_no_identity() {
        assert!(identify(std::iter::empty()).is_empty());
    }

    #[test]
    fn a_worker_listed_twice_counts_once() {
        let (a, b, c) = (w("a"), w("b"), w("c"));
        let ids = identify([
            (&a, "tiny", "bbbb"),
            (&a, "tiny", "bbbb"),
            (&b, "tiny", "aaaa"),
            (&c, "tiny", "aaaa"),
        ]);
        assert_eq!(ids[0].chosen(), "aaaa");
        assert_eq!(ids[0].hashes[1].workers.len(), 1);
    }

    #[test]
    fn short_hashes_and_holdings_read_well() {
        assert_eq!(short_hash("0a1b2c3d4e5f6a7b8c9d"), "0a1b2c3d4e5f");
        assert_eq!(short_hash("abc"), "abc");
        let (a, b, c) = (w("a"), w("b"), w("c"));
        let ids = identify([
            (&a, "tiny", "0a1b2c3d4e5f6a7b"),
            (&b, "tiny", "0a1b2c3d4e5f6a7b"),
            (&c, "tiny", "abc123def4567890"),
        ]);
        assert_eq!(
            ids[0].holdings(),
            "0a1b2c3d4e5f (2 workers), abc123def456 (1 worker)"
        );
    }
}
