//! The model catalog and residency: which models a worker can render, which
//! of them are loaded, and which one to evict when memory runs short.
//!
//! The catalog is what `--model NAME=DIR` lists: every model in it is
//! located and hashed when the worker starts ([`CatalogEntry`]), and the whole
//! catalog is announced to the coordinator. Loading is separate: a
//! [`Residency`] holds the loaded pipelines in least-recently-used order under
//! an optional byte budget (`--memory-budget`), loading a model on first use
//! and evicting the coldest ones to make room.
//!
//! Why announce the catalog rather than what is resident: the coordinator
//! admits a job only if some worker announced its model, and it learns models
//! at registration only. Residency changes with every eviction; announcing
//! only resident models would make a farm refuse jobs for a model every worker
//! happened to evict, though any of them can load it again in seconds. So
//! residency stays local to the worker, and the catalog, with each model's
//! content hash, is the contract.

use std::path::PathBuf;

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

/// A model larger than the whole budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("needs {}, more than the memory budget of {}", format_size(*bytes), format_size(*budget))]
pub struct OverBudget {
    /// What the model needs.
    pub bytes: u64,
    /// The whole budget.
    pub budget: u64,
}

/// Loaded values (pipelines) by name, least recently used first, under an
/// optional budget in bytes.
///
/// Values are handed out as clones (an `Arc` in the renderer), so an evicted
/// pipeline that a render still uses stays alive until that render ends: the
/// budget bounds what the residency keeps, not a render already under way.
#[derive(Debug)]
pub struct Residency<V> {
    /// The most bytes resident at once; `None` = no limit.
    budget: Option<u64>,
    /// Least recently used first.
    entries: Vec<Resident<V>>,
}

#[derive(Debug)]
struct Resident<V> {
    name: String,
    bytes: u64,
    value: V,
}

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

    /// Returns the bytes held now.
    pub fn used(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Returns the resident names, least recently used first.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// Returns the value of a resident model and marks it most recently used.
    pub fn get(&mut self, name: &str) -> Option<V> {
        let i = self.entries.iter().position(|e| e.name == name)?;
        let entry = self.entries.remove(i);
        let value = entry.value.clone();
        self.entries.push(entry);
        Some(value)
    }

    /// Returns the value of a resident model without marking it used.
    pub fn peek(&self, name: &str) -> Option<V> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.value.clone())
    }

    /// Returns true if `bytes` more fit without evicting anything.
    pub fn fits_now(&self, bytes: u64) -> bool {
        self.budget
            .is_none_or(|budget| self.used().saturating_add(bytes) <= budget)
    }

    /// Evicts least recently used models until `bytes` more fit; returns them
    /// (name and value), coldest first.
    ///
    /// # Errors
    /// [`OverBudget`] when `bytes` exceed the whole budget; nothing is evicted then.
    pub fn make_room(&mut self, bytes: u64) -> Result<Vec<(String, V)>, OverBudget> {
        let Some(budget) = self.budget else {
            return Ok(Vec::new());
        };
        if bytes > budget {
            return Err(OverBudget { bytes, budget });
        }
        let mut evicted = Vec::new();
        while !self.fits_now(bytes) && !self.entries.is_empty() {
            let coldest = self.entries.remove(0);
            evicted.push((coldest.name, coldest.value));
        }
        Ok(evicted)
    }

    /// Makes `name` resident as the most recently used model, evicting what
    /// must go (returned, coldest first). A model already resident under that
    /// name is replaced.
    ///
    /// # Errors
    /// [`OverBudget`] when `bytes` exceed the whole budget; nothing changes then.
    pub fn insert(
        &mut self,
        name: &str,
        bytes: u64,
        value: V,
    ) -> Result<Vec<(String, V)>, OverBudget> {
        if let Some(budget) = self.budget
            && bytes > budget
        {
            return Err(OverBudget { bytes, budget });
        }
        let mut evicted = Vec::new();
        if let Some(i) = self.entries.iter().position(|e| e.name == name) {
            let old = self.entries.remove(i);
            evicted.push((old.name, old.value));
        }
        evicted.extend(self.make_room(bytes)?);
        self.entries.push(Resident {
            name: name.to_string(),
            bytes,
            value,
        });
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

    #[test]
    fn least_recently_used_is_evicted_first() {
        let mut r: Residency<&str> = Residency::new(Some(10 * GB));
        assert!(r.insert("sd15", 4 * GB, "A").unwrap().is_empty());
        assert!(r.insert("sd21", 4 * GB, "B").unwrap().is_empty());
        assert_eq!(r.used(), 8 * GB);
        // Touch sd15: sd21 becomes the coldest.
        assert_eq!(r.peek("sd15"), Some("A"));
        assert_eq!(r.names(), ["sd15", "sd21"], "peek does not count as use");
        assert_eq!(r.get("sd15"), Some("A"));
        assert_eq!(r.names(), ["sd21", "sd15"]);
        // 4 more GB do not fit in 10: the coldest goes.
        let evicted = r.insert("turbo", 4 * GB, "C").unwrap();
        assert_eq!(evicted, [("sd21".to_string(), "B")]);
        assert_eq!(r.names(), ["sd15", "turbo"]);
        assert_eq!(r.get("sd21"), None);
        // A big one evicts as many as it needs, coldest first.
        let evicted = r.insert("sdxl", 9 * GB, "D").unwrap();
        let names: Vec<_> = evicted.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sd15", "turbo"]);
        assert_eq!(r.names(), ["sdxl"]);
        assert_eq!(r.used(), 9 * GB);
    }

    #[test]
    fn a_model_larger_than_the_budget_is_refused_and_nothing_is_evicted() {
        let mut r: Residency<u32> = Residency::new(Some(8 * GB));
        r.insert("small", 2 * GB, 1).unwrap();
        let e = r.insert("huge", 9 * GB, 2).unwrap_err();
        assert_eq!(
            e,
            OverBudget {
                bytes: 9 * GB,
                budget: 8 * GB
            }
        );
        assert!(e.to_string().contains("9.00 GiB"), "{e}");
        assert_eq!(r.names(), ["small"]);
        assert!(r.make_room(9 * GB).is_err());
        assert_eq!(r.names(), ["small"]);
    }

    #[test]
    fn make_room_evicts_only_what_is_needed() {
        let mut r: Residency<u32> = Residency::new(Some(6));
        r.insert("a", 2, 1).unwrap();
        r.insert("b", 2, 2).unwrap();
        r.insert("c", 2, 3).unwrap();
        assert!(r.fits_now(0));
        assert!(!r.fits_now(1));
        let evicted = r.make_room(3).unwrap();
        assert_eq!(evicted, [("a".to_string(), 1), ("b".to_string(), 2)]);
        assert!(r.fits_now(3));
        assert_eq!(r.names(), ["c"]);
    }

    #[test]
    fn without_a_budget_nothing_is_evicted() {
        let mut r: Residency<u32> = Residency::new(None);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            assert!(r.insert(name, u64::MAX / 4, i as u32).unwrap().is_empty());
        }
        assert_eq!(r.names(), ["a", "b", "c"]);
        assert!(r.fits_now(u64::MAX));
    }

    #[test]
    fn reinserting_a_name_replaces_it() {
        let mut r: Residency<u32> = Residency::new(Some(10));
        r.insert("a", 4, 1).unwrap();
        r.insert("b", 4, 2).unwrap();
        let evicted = r.insert("a", 5, 3).unwrap();
        assert_eq!(evicted, [("a".to_string(), 1)]);
        assert_eq!(r.names(), ["b", "a"]);
        assert_eq!(r.get("a"), Some(3));
        assert_eq!(r.used(), 9);
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
