//! The model catalog and residency: which models a worker can render, which
//! of them are loaded, what else their pipelines hold, and what to evict when
//! memory runs short.
//!
//! The catalog is what `--model NAME=DIR` lists: every model in it is
//! located and hashed when the worker starts ([`CatalogEntry`]), and the whole
//! catalog is announced to the coordinator. Loading is separate: a
//! [`Residency`] holds the loaded pipelines in least-recently-used order under
//! an optional byte budget (`--memory-budget`), loading a model on first use
//! and evicting the coldest entries to make room.
//!
//! One budget covers everything resident: each model, and each part its
//! pipeline holds beyond the model (a UNet or text encoder merged with a LoRA
//! set, a ControlNet: [`kiln_diffusion::Part`]), all sized by one measure
//! ([`kiln_diffusion::resident_bytes`]'s). A part belongs to its model: it goes
//! when its model goes, and keeping a part keeps its model. What a render in
//! progress uses is kept while room is made (`keep`), so nothing it needs is
//! evicted; what cannot fit beside it is refused with [`OverBudget`].
//!
//! Why announce the catalog rather than what is resident: the coordinator
//! admits a job only if some worker announced its model, and it learns models
//! at registration only. Residency changes with every eviction; announcing
//! only resident models would make a farm refuse jobs for a model every worker
//! happened to evict, though any of them can load it again in seconds. So
//! residency stays local to the worker, and the catalog, with each model's
//! content hash, is the contract.

use std::path::PathBuf;

use kiln_diffusion::Part;

/// A model this worker can render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEntry {
    /// The catalog name recipes use.
    pub name: String,
    /// The diffusers-layout folder; `None` for a pipeline handed over already
    /// loaded, which cannot be loaded again once evicted.
    pub dir: Option<PathBuf>,
    /// The model's content hash.
    pub hash: String,
    /// Estimated memory the loaded model holds (see
    /// [`kiln_diffusion::resident_bytes`]).
    pub bytes: u64,
}

/// What does not fit: more bytes at once than the whole budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("needs {}, more than the memory budget of {}", format_size(*bytes), format_size(*budget))]
pub struct OverBudget {
    /// What must be resident at once (the entry, and what is kept beside it).
    pub bytes: u64,
    /// The whole budget.
    pub budget: u64,
}

/// One resident entry: a model, or a part of a model's pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    /// The catalog name of the model (the part's owner).
    pub model: String,
    /// `None` for the model itself.
    pub part: Option<Part>,
}

impl Slot {
    /// The slot of a model.
    pub fn model(name: &str) -> Self {
        Self {
            model: name.to_string(),
            part: None,
        }
    }

    /// The slot of a part of a model's pipeline.
    pub fn part(model: &str, part: Part) -> Self {
        Self {
            model: model.to_string(),
            part: Some(part),
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.part {
            None => write!(f, "model {:?}", self.model),
            Some(part) => write!(f, "{part} of model {:?}", self.model),
        }
    }
}

/// Loaded values (pipelines) by slot, least recently used first, under an
/// optional budget in bytes.
///
/// Values are handed out as clones (an `Arc` in the renderer), so an evicted
/// pipeline that a render still uses stays alive until that render ends: the
/// budget bounds what the residency keeps, not a render already under way.
/// A part's value is its model's (the pipeline that holds it).
#[derive(Debug)]
pub struct Residency<V> {
    /// The most bytes resident at once; `None` = no limit.
    budget: Option<u64>,
    /// Least recently used first.
    entries: Vec<Resident<V>>,
}

#[derive(Debug)]
struct Resident<V> {
    slot: Slot,
    bytes: u64,
    value: V,
}

/// Evicted entries: slot and value, coldest first.
pub type Evicted<V> = Vec<(Slot, V)>;

impl<V: Clone> Residency<V> {
    /// Returns an empty residency with `budget` bytes (`None`: no limit).
    pub fn new(budget: Option<u64>) -> Self {
        Self {
            budget,
            entries: Vec::new(),
        }
    }

    /// Returns the budget in bytes, if any.
    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// Returns the bytes held now: models and parts.
    pub fn used(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Returns the resident models' names, least recently used first.
    pub fn names(&self) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|e| e.slot.part.is_none())
            .map(|e| e.slot.model.as_str())
            .collect()
    }

    /// Returns every resident slot, models and parts, least recently used first.
    pub fn slots(&self) -> Vec<&Slot> {
        self.entries.iter().map(|e| &e.slot).collect()
    }

    /// Returns the parts of `model` resident now.
    pub fn parts_of(&self, model: &str) -> Vec<Part> {
        self.entries
            .iter()
            .filter(|e| e.slot.model == model)
            .filter_map(|e| e.slot.part.clone())
            .collect()
    }

    /// Returns true when `slot` is resident.
    pub fn contains(&self, slot: &Slot) -> bool {
        self.entries.iter().any(|e| &e.slot == slot)
    }

    /// Returns the value of a resident model and marks it most recently used.
    pub fn get(&mut self, name: &str) -> Option<V> {
        let slot = Slot::model(name);
        self.touch(&slot).then(|| self.peek(name)).flatten()
    }

    /// Returns the value of a resident model without marking it used.
    pub fn peek(&self, name: &str) -> Option<V> {
        self.entries
            .iter()
            .find(|e| e.slot.model == name && e.slot.part.is_none())
            .map(|e| e.value.clone())
    }

    /// Marks a resident slot most recently used; returns false when it is not resident.
    pub fn touch(&mut self, slot: &Slot) -> bool {
        let Some(i) = self.entries.iter().position(|e| &e.slot == slot) else {
            return false;
        };
        let entry = self.entries.remove(i);
        self.entries.push(entry);
        true
    }

    /// Returns true if `bytes` more fit without evicting anything.
    pub fn fits_now(&self, bytes: u64) -> bool {
        self.budget
            .is_none_or(|budget| self.used().saturating_add(bytes) <= budget)
    }

    /// Returns true when `slot` may not be evicted while `keep` is kept: it is
    /// kept, or it is the model of a kept part.
    fn kept(slot: &Slot, keep: &[Slot]) -> bool {
        keep.iter()
            .any(|k| k == slot || (slot.part.is_none() && k.model == slot.model))
    }

    /// Returns the bytes of the resident entries `keep` keeps.
    fn kept_bytes(&self, keep: &[Slot]) -> u64 {
        self.entries
            .iter()
            .filter(|e| Self::kept(&e.slot, keep))
            .map(|e| e.bytes)
            .sum()
    }

    /// Evicts least recently used entries, never one `keep` keeps, until `bytes`
    /// more fit; returns them, coldest first. A model evicted takes its parts
    /// with it (listed after it).
    ///
    /// # Errors
    /// [`OverBudget`] when `bytes` and what `keep` keeps exceed the whole budget;
    /// nothing is evicted then.
    pub fn make_room(&mut self, bytes: u64, keep: &[Slot]) -> Result<Evicted<V>, OverBudget> {
        let Some(budget) = self.budget else {
            return Ok(Vec::new());
        };
        let needed = self.kept_bytes(keep).saturating_add(bytes);
        if needed > budget {
            return Err(OverBudget {
                bytes: needed,
                budget,
            });
        }
        let mut evicted = Vec::new();
        while !self.fits_now(bytes) {
            let Some(i) = self.entries.iter().position(|e| !Self::kept(&e.slot, keep)) else {
                break;
            };
            let coldest = self.entries.remove(i);
            if coldest.slot.part.is_none() {
                evicted.push((coldest.slot.clone(), coldest.value));
                let model = coldest.slot.model;
                evicted.extend(self.take(|s| s.model == model));
            } else {
                evicted.push((coldest.slot, coldest.value));
            }
        }
        Ok(evicted)
    }

    /// Removes a slot (a model with its parts); returns what was removed.
    pub fn remove(&mut self, slot: &Slot) -> Evicted<V> {
        match &slot.part {
            None => self.take(|s| s.model == slot.model),
            Some(_) => self.take(|s| s == slot),
        }
    }

    /// Removes the entries whose slot matches, in order.
    fn take(&mut self, matches: impl Fn(&Slot) -> bool) -> Evicted<V> {
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| matches(&e.slot));
        self.entries = kept;
        taken.into_iter().map(|e| (e.slot, e.value)).collect()
    }

    /// Makes `slot` resident as the most recently used entry, evicting what must
    /// go (returned, coldest first) but never what `keep` keeps, nor the model
    /// of the part inserted. An entry already resident in that slot is replaced
    /// (a model with its parts).
    ///
    /// # Errors
    /// [`OverBudget`] when `bytes` and what is kept exceed the whole budget;
    /// nothing changes then.
    pub fn insert(
        &mut self,
        slot: Slot,
        bytes: u64,
        value: V,
        keep: &[Slot],
    ) -> Result<Evicted<V>, OverBudget> {
        let mut keep = keep.to_vec();
        keep.push(slot.clone());
        if let Some(budget) = self.budget {
            let replaced = self
                .entries
                .iter()
                .find(|e| e.slot == slot)
                .map_or(0, |e| e.bytes);
            let needed = (self.kept_bytes(&keep) - replaced).saturating_add(bytes);
            if needed > budget {
                return Err(OverBudget {
                    bytes: needed,
                    budget,
                });
            }
        }
        // A model replaced takes its parts along: they belong to the old value.
        let mut evicted = self.remove(&slot);
        evicted.extend(self.make_room(bytes, &keep)?);
        self.entries.push(Resident { slot, bytes, value });
        Ok(evicted)
    }
}

/// Why a size such as `8GiB` was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a size: {reason} (examples: 8GiB, 512MiB, 6GB, 1073741824)")]
pub struct SizeError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parses a byte size: a number with an optional unit, `B`, decimal `KB`,
/// `MB`, `GB`, `TB` (also `K`, `M`, `G`, `T`) or binary `KiB`, `MiB`, `GiB`,
/// `TiB`; case-insensitive, spaces allowed, fractions allowed (`1.5GiB`).
///
/// # Errors
/// [`SizeError`] quoting the text.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = |reason: &str| SizeError {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| err("it does not start with a number"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(err("unknown unit")),
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(err("it must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// Formats bytes for people: `7.95 GiB`, `512.00 MiB`, `980 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{value:.2} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn m(name: &str) -> Slot {
        Slot::model(name)
    }

    fn evicted_names<V>(evicted: &Evicted<V>) -> Vec<String> {
        evicted.iter().map(|(s, _)| s.to_string()).collect()
    }

    #[test]
    fn least_recently_used_is_evicted_first() {
        let mut r: Residency<&str> = Residency::new(Some(10 * GB));
        assert!(r.insert(m("sd15"), 4 * GB, "A", &[]).unwrap().is_empty());
        assert!(r.insert(m("sd21"), 4 * GB, "B", &[]).unwrap().is_empty());
        assert_eq!(r.used(), 8 * GB);
        // Touch sd15: sd21 becomes the coldest.
        assert_eq!(r.peek("sd15"), Some("A"));
        assert_eq!(r.names(), ["sd15", "sd21"], "peek does not count as use");
        assert_eq!(r.get("sd15"), Some("A"));
        assert_eq!(r.names(), ["sd21", "sd15"]);
        // 4 more GB do not fit in 10: the coldest goes.
        let evicted = r.insert(m("turbo"), 4 * GB, "C", &[]).unwrap();
        assert_eq!(evicted, [(m("sd21"), "B")]);
        assert_eq!(r.names(), ["sd15", "turbo"]);
        assert_eq!(r.get("sd21"), None);
        // A big one evicts as many as it needs, coldest first.
        let evicted = r.insert(m("sdxl"), 9 * GB, "D", &[]).unwrap();
        assert_eq!(
            evicted_names(&evicted),
            ["model \"sd15\"", "model \"turbo\""]
        );
        assert_eq!(r.names(), ["sdxl"]);
        assert_eq!(r.used(), 9 * GB);
    }

    #[test]
    fn a_model_larger_than_the_budget_is_refused_and_nothing_is_evicted() {
        let mut r: Residency<u32> = Residency::new(Some(8 * GB));
        r.insert(m("small"), 2 * GB, 1, &[]).unwrap();
        let e = r.insert(m("huge"), 9 * GB, 2, &[]).unwrap_err();
        assert_eq!(
            e,
            OverBudget {
                bytes: 9 * GB,
                budget: 8 * GB
            }
        );
        assert!(e.to_string().contains("9.00 GiB"), "{e}");
        assert_eq!(r.names(), ["small"]);
        assert!(r.make_room(9 * GB, &[]).is_err());
        assert_eq!(r.names(), ["small"]);
    }

    #[test]
    fn make_room_evicts_only_what_is_needed() {
        let mut r: Residency<u32> = Residency::new(Some(6));
        r.insert(m("a"), 2, 1, &[]).unwrap();
        r.insert(m("b"), 2, 2, &[]).unwrap();
        r.insert(m("c"), 2, 3, &[]).unwrap();
        assert!(r.fits_now(0));
        assert!(!r.fits_now(1));
        let evicted = r.make_room(3, &[]).unwrap();
        assert_eq!(evicted, [(m("a"), 1), (m("b"), 2)]);
        assert!(r.fits_now(3));
        assert_eq!(r.names(), ["c"]);
    }

    #[test]
    fn without_a_budget_nothing_is_evicted() {
        let mut r: Residency<u32> = Residency::new(None);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            assert!(
                r.insert(m(name), u64::MAX / 4, i as u32, &[])
                    .unwrap()
                    .is_empty()
            );
        }
        assert_eq!(r.names(), ["a", "b", "c"]);
        assert!(r.fits_now(u64::MAX));
    }

    #[test]
    fn reinserting_a_name_replaces_it() {
        let mut r: Residency<u32> = Residency::new(Some(10));
        r.insert(m("a"), 4, 1, &[]).unwrap();
        r.insert(m("b"), 4, 2, &[]).unwrap();
        let evicted = r.insert(m("a"), 5, 3, &[]).unwrap();
        assert_eq!(evicted, [(m("a"), 1)]);
        assert_eq!(r.names(), ["b", "a"]);
        assert_eq!(r.get("a"), Some(3));
        assert_eq!(r.used(), 9);
    }

    fn variant(model: &str, set: &str) -> Slot {
        Slot::part(
            model,
            Part::LoraVariant {
                component: "unet",
                loras: set.into(),
            },
        )
    }

    fn controlnet(model: &str, hash: &str) -> Slot {
        Slot::part(model, Part::ControlNet { hash: hash.into() })
    }

    #[test]
    fn models_variants_and_controlnets_share_one_budget_coldest_out_first() {
        let mut r: Residency<&str> = Residency::new(Some(10));
        r.insert(m("sd15"), 4, "sd15", &[]).unwrap();
        r.insert(variant("sd15", "A"), 2, "sd15", &[]).unwrap();
        r.insert(controlnet("sd15", "pose"), 1, "sd15", &[])
            .unwrap();
        r.insert(m("xl"), 3, "xl", &[]).unwrap();
        assert_eq!(r.used(), 10, "parts count beside models");
        assert_eq!(r.names(), ["sd15", "xl"], "names lists models only");
        assert_eq!(r.parts_of("sd15").len(), 2);

        // A render on sd15 with variant B: the model is the coldest entry but the
        // render uses it, so the next coldest, variant A, goes.
        let keep = [m("sd15"), variant("sd15", "B")];
        let evicted = r.make_room(2, &keep).unwrap();
        assert_eq!(evicted, [(variant("sd15", "A"), "sd15")]);
        assert!(
            r.insert(variant("sd15", "B"), 2, "sd15", &keep)
                .unwrap()
                .is_empty()
        );
        assert_eq!(r.used(), 10);

        // The ControlNet is used again: it becomes the hottest.
        assert!(r.touch(&controlnet("sd15", "pose")));
        assert!(!r.touch(&controlnet("sd15", "edge")), "not resident");
        let order: Vec<String> = r.slots().iter().map(|s| s.to_string()).collect();
        assert_eq!(
            order,
            [
                "model \"sd15\"",
                "model \"xl\"",
                "unet merged with LoRAs B of model \"sd15\"",
                "ControlNet pose of model \"sd15\"",
            ]
        );

        // Evicting a model takes its parts along, however hot they are.
        let evicted = r.make_room(5, &[m("xl")]).unwrap();
        assert_eq!(
            evicted,
            [
                (m("sd15"), "sd15"),
                (variant("sd15", "B"), "sd15"),
                (controlnet("sd15", "pose"), "sd15"),
            ]
        );
        assert_eq!(r.slots(), [&m("xl")]);
        assert_eq!(r.used(), 3);
    }

    #[test]
    fn a_part_that_cannot_fit_beside_what_the_render_keeps_is_refused() {
        let mut r: Residency<u32> = Residency::new(Some(10));
        r.insert(m("xl"), 3, 1, &[]).unwrap();
        r.insert(m("sd15"), 4, 2, &[]).unwrap();
        // 8 bytes of ControlNet beside its model (3): 11 > 10, though evicting
        // sd15 would free 4. Nothing is evicted.
        let big = controlnet("xl", "big");
        let e = r.make_room(8, &[m("xl"), big.clone()]).unwrap_err();
        assert_eq!(
            e,
            OverBudget {
                bytes: 11,
                budget: 10
            }
        );
        assert_eq!(r.names(), ["xl", "sd15"]);
        // Inserting a part keeps its model, even when not named in `keep`.
        let e = r.insert(big.clone(), 8, 1, &[]).unwrap_err();
        assert_eq!(
            e,
            OverBudget {
                bytes: 11,
                budget: 10
            }
        );
        assert_eq!(r.used(), 7);
        // 7 fit: sd15 goes, xl stays for its part.
        let evicted = r.insert(big.clone(), 7, 1, &[]).unwrap();
        assert_eq!(evicted, [(m("sd15"), 2)]);
        assert_eq!(r.slots(), [&m("xl"), &big]);
        assert_eq!(r.used(), 10);
    }

    #[test]
    fn removing_a_model_removes_its_parts_and_a_part_alone() {
        let mut r: Residency<u32> = Residency::new(None);
        r.insert(m("a"), 4, 1, &[]).unwrap();
        r.insert(variant("a", "A"), 2, 1, &[]).unwrap();
        r.insert(controlnet("a", "pose"), 1, 1, &[]).unwrap();
        r.insert(m("b"), 3, 2, &[]).unwrap();
        assert_eq!(r.remove(&controlnet("a", "pose")).len(), 1);
        assert!(r.contains(&variant("a", "A")));
        assert_eq!(r.used(), 9);
        // Replacing a model drops the parts of the old one.
        let evicted = r.insert(m("a"), 4, 3, &[]).unwrap();
        assert_eq!(evicted, [(m("a"), 1), (variant("a", "A"), 1)]);
        assert_eq!(r.parts_of("a"), []);
        assert_eq!(r.remove(&m("b")), [(m("b"), 2)]);
        assert_eq!(r.used(), 4);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("8 gib").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("6GB").unwrap(), 6_000_000_000);
        assert_eq!(parse_size("6G").unwrap(), 6_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "GiB", "8 parsecs", "0", "-1GiB", "1.2.3GB"] {
            let e = parse_size(bad).unwrap_err();
            assert_eq!(e.text, bad);
        }
    }

    #[test]
    fn sizes_format_for_people() {
        assert_eq!(format_size(980), "980 B");
        assert_eq!(format_size(512 << 20), "512.00 MiB");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
    }
}
