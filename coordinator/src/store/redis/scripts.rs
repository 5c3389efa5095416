//! The Lua scripts of the Redis store and the constants they share with Rust.
//!
//! Every script is built from three parts: a block of `local NAME = value`
//! lines generated here from the Rust definitions (the policy numbers in
//! [`policy`], the layouts of script arguments and replies that `mod.rs`
//! reads and writes, and the stored names of every state, outcome, fault,
//! event kind and abandon reason), then `prelude.lua`, then the script. So a
//! number or a name changed in Rust reaches Lua on the next build; the test
//! below fails when a script writes a number of its own.

use redis::Script;

use crate::store::USAGE_DAY_MS;
use crate::store::policy;
use crate::store::state::messages;
use crate::store::{
    AbandonReason, EventKind, Fault, JobState, Outcome, StateName, TaskState, WorkerState,
};

/// Candidates read per model and job beyond `max` when a claim looks for its
/// first task: the first usually fits; more step over tasks the worker may
/// not take. The memory store scans its whole queue instead.
pub(super) const CLAIM_LOOKAHEAD: usize = 8;
/// Tasks read per job beyond the free slots when a claim fills them.
pub(super) const FILL_LOOKAHEAD: usize = 32;
/// Script arguments per task of `enqueue.lua`.
pub(super) const TASK_ARGS: usize = 15;
/// Reply values per lease of `claim.lua`.
pub(super) const LEASE_FIELDS: usize = 8;
/// Reply values per deduplicated task of `claim.lua`.
pub(super) const DEDUPED_FIELDS: usize = 5;
/// Reply values per reaped lease of `reap.lua`.
pub(super) const REAPED_FIELDS: usize = 6;
/// Reply values per released lease of `register.lua`.
pub(super) const RELEASED_FIELDS: usize = 4;
/// Script arguments per task of `heartbeat.lua`.
pub(super) const PROGRESS_FIELDS: usize = 3;
/// Reply values per live worker of `live.lua`.
pub(super) const LIVE_FIELDS: usize = 3;
/// Reply values per row of `pinned.lua`.
pub(super) const PIN_FIELDS: usize = 4;
/// Joins day, project, model and counter in a field of the `usage` hash
/// (names never hold it: the catalog name rule).
pub(super) const USAGE_SEP: &str = "|";
/// The `usage` hash's counter names.
pub(super) const USAGE_IMAGES: &str = "images";
pub(super) const USAGE_RENDER_MS: &str = "render_ms";
pub(super) const USAGE_FAILED: &str = "failed_attempts";
/// Reply values per delivery of `deliveries.lua`.
pub(super) const DELIVERY_FIELDS: usize = 4;
/// Arguments of one completion (`complete` in `complete.lua`), a call of `dispatch.lua`.
pub(super) const COMPLETE_ARGS: usize = 5;
/// Arguments of one claim (`claim` in `claim.lua`), a call of `dispatch.lua`.
pub(super) const CLAIM_ARGS: usize = 8;
/// Where `dispatch.lua`'s first call starts: after the prefix, the
/// retention and the number of calls.
pub(super) const FIRST_CALL_ARG: usize = 4;
/// The ops of `dispatch.lua`'s calls.
pub(super) const OP_COMPLETE: &str = "complete";
pub(super) const OP_CLAIM: &str = "claim";
pub(super) const OP_COMPLETE_CLAIM: &str = "complete_claim";

// The hand-written sources; each script is prefixed with the generated
// constants and `prelude.lua`.
const PRELUDE: &str = include_str!("prelude.lua");
const ENQUEUE: &str = include_str!("enqueue.lua");
const CLAIM: &str = include_str!("claim.lua");
const DISPATCH: &str = include_str!("dispatch.lua");
const HEARTBEAT: &str = include_str!("heartbeat.lua");
const COMPLETE: &str = include_str!("complete.lua");
const FAIL: &str = include_str!("fail.lua");
const REAP: &str = include_str!("reap.lua");
const CANCEL: &str = include_str!("cancel.lua");
const REGISTER: &str = include_str!("register.lua");
const DRAIN: &str = include_str!("drain.lua");
const STATS: &str = include_str!("stats.lua");
const LIVE: &str = include_str!("live.lua");
const PINNED: &str = include_str!("pinned.lua");
const FAIL_UNHELD: &str = include_str!("fail_unheld.lua");
const PAUSE: &str = include_str!("pause.lua");
const PRIORITY: &str = include_str!("priority.lua");
const RETRY: &str = include_str!("retry.lua");
const DELIVERIES: &str = include_str!("deliveries.lua");
const SETTLE: &str = include_str!("settle.lua");
const PREVIEW: &str = include_str!("preview.lua");

/// Every script by file name, prelude first, for the checks below to scan.
#[cfg(test)]
const SOURCES: &[(&str, &str)] = &[
    ("prelude.lua", PRELUDE),
    ("enqueue.lua", ENQUEUE),
    ("claim.lua", CLAIM),
    ("dispatch.lua", DISPATCH),
    ("heartbeat.lua", HEARTBEAT),
    ("complete.lua", COMPLETE),
    ("fail.lua", FAIL),
    ("reap.lua", REAP),
    ("cancel.lua", CANCEL),
    ("register.lua", REGISTER),
    ("drain.lua", DRAIN),
    ("stats.lua", STATS),
    ("live.lua", LIVE),
    ("pinned.lua", PINNED),
    ("fail_unheld.lua", FAIL_UNHELD),
    ("pause.lua", PAUSE),
    ("priority.lua", PRIORITY),
    ("retry.lua", RETRY),
    ("deliveries.lua", DELIVERIES),
    ("settle.lua", SETTLE),
    ("preview.lua", PREVIEW),
];

/// Returns the `local NAME = value` lines every script starts with.
pub(super) fn constants() -> String {
    let numbers: [(&str, u64); 24] = [
        ("USAGE_DAY_MS", USAGE_DAY_MS as u64),
        ("QUARANTINE_AFTER", u64::from(policy::QUARANTINE_AFTER)),
        (
            "SWITCH_BACKLOG_PER_HOLDER",
            policy::SWITCH_BACKLOG_PER_HOLDER as u64,
        ),
        (
            "SWITCH_MARGIN_PERCENT",
            policy::SWITCH_MARGIN_PERCENT as u64,
        ),
        ("LIVE_MS", policy::LIVE_MS),
        (
            "MAX_DEDUPED_PER_CLAIM",
            policy::MAX_DEDUPED_PER_CLAIM as u64,
        ),
        ("CLAIM_LOOKAHEAD", CLAIM_LOOKAHEAD as u64),
        ("FILL_LOOKAHEAD", FILL_LOOKAHEAD as u64),
        ("READY_LOOKAHEAD", policy::READY_LOOKAHEAD as u64),
        ("TASK_ARGS", TASK_ARGS as u64),
        ("LEASE_FIELDS", LEASE_FIELDS as u64),
        ("DEDUPED_FIELDS", DEDUPED_FIELDS as u64),
        ("REAPED_FIELDS", REAPED_FIELDS as u64),
        ("RELEASED_FIELDS", RELEASED_FIELDS as u64),
        ("PROGRESS_FIELDS", PROGRESS_FIELDS as u64),
        ("LIVE_FIELDS", LIVE_FIELDS as u64),
        ("PIN_FIELDS", PIN_FIELDS as u64),
        ("DELIVERY_FIELDS", DELIVERY_FIELDS as u64),
        ("COMPLETE_ARGS", COMPLETE_ARGS as u64),
        ("CLAIM_ARGS", CLAIM_ARGS as u64),
        ("FIRST_CALL_ARG", FIRST_CALL_ARG as u64),
        // Redis TIME answers seconds and microseconds; deadlines are in ms.
        ("MS_PER_S", 1_000),
        ("US_PER_MS", 1_000),
        // policy::SWITCH_MARGIN_PERCENT is in hundredths.
        ("PERCENT", 100),
    ];
    let mut out = String::from("-- Generated from Rust by redis/scripts.rs.\n");
    for (name, value) in numbers {
        out.push_str(&format!("local {name} = {value}\n"));
    }
    let mut names = Vec::new();
    names.extend(JobState::names());
    names.extend(TaskState::names());
    names.extend(Outcome::names());
    names.extend(Fault::names());
    names.extend(EventKind::names());
    names.extend(AbandonReason::names());
    names.extend(WorkerState::names());
    for (name, value) in names {
        out.push_str(&format!("local {name} = '{value}'\n"));
    }
    let msgs = [
        ("MSG_PAUSED", messages::PAUSED),
        ("MSG_RESUMED", messages::RESUMED),
        ("MSG_RETRIED", messages::RETRIED),
        ("MSG_PRIORITY", messages::PRIORITY),
        ("USAGE_SEP", USAGE_SEP),
        ("USAGE_IMAGES", USAGE_IMAGES),
        ("USAGE_RENDER_MS", USAGE_RENDER_MS),
        ("USAGE_FAILED", USAGE_FAILED),
        ("OP_COMPLETE", OP_COMPLETE),
        ("OP_CLAIM", OP_CLAIM),
        ("OP_COMPLETE_CLAIM", OP_COMPLETE_CLAIM),
    ];
    for (name, value) in msgs {
        out.push_str(&format!("local {name} = '{value}'\n"));
    }
    // Attempts and events without a fault store the empty name.
    out.push_str("local FAULT_NONE = ''\n");
    let faults: Vec<String> = Outcome::ALL
        .iter()
        .filter(|o| o.is_fault())
        .map(|o| format!("[{}] = true", o.lua_const()))
        .collect();
    out.push_str(&format!("local IS_FAULT = {{{}}}\n", faults.join(", ")));
    out
}

/// Returns a script: the constants, the prelude, then `body`.
fn build(body: &str) -> Script {
    build_of(&[body])
}

/// Returns a script: the constants, the prelude, then `parts` in order
/// (the functions a script calls, then the script).
fn build_of(parts: &[&str]) -> Script {
    Script::new(&format!("{}{PRELUDE}{}", constants(), parts.concat()))
}

/// The compiled scripts, one per transition, and the reads that must see
/// the store's clock (`live.lua`) or several keys at once (`pinned.lua`).
pub(super) struct Scripts {
    pub(super) enqueue: Script,
    pub(super) heartbeat: Script,
    /// Completions and claims, several in one run (`dispatch.lua` over
    /// `complete.lua` and `claim.lua`).
    pub(super) dispatch: Script,
    pub(super) fail: Script,
    pub(super) reap: Script,
    pub(super) cancel: Script,
    pub(super) register: Script,
    pub(super) drain: Script,
    /// The farm counts: a read, in a script for one consistent snapshot.
    pub(super) stats: Script,
    pub(super) live: Script,
    pub(super) pinned: Script,
    pub(super) fail_unheld: Script,
    pub(super) pause: Script,
    pub(super) priority: Script,
    pub(super) retry: Script,
    pub(super) deliveries: Script,
    pub(super) settle: Script,
    pub(super) preview: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            enqueue: build(ENQUEUE),
            heartbeat: build(HEARTBEAT),
            dispatch: build_of(&[COMPLETE, CLAIM, DISPATCH]),
            fail: build(FAIL),
            reap: build(REAP),
            cancel: build(CANCEL),
            register: build(REGISTER),
            drain: build(DRAIN),
            stats: build(STATS),
            live: build(LIVE),
            pinned: build(PINNED),
            fail_unheld: build(FAIL_UNHELD),
            pause: build(PAUSE),
            priority: build(PRIORITY),
            retry: build(RETRY),
            deliveries: build(DELIVERIES),
            settle: build(SETTLE),
            preview: build(PREVIEW),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Argument positions a script reads outside an index expression: each is
    /// the first position of a repeated group, documented in the script's
    /// header (`ARGV: ...`) and written by `mod.rs` in the same order.
    const ARGUMENT_POSITIONS: &[(&str, &str)] = &[("enqueue.lua", "14"), ("heartbeat.lua", "6")];

    /// Removes comments and string literals, so only code is scanned.
    fn code_of(source: &str) -> String {
        let mut out = String::new();
        for line in source.lines() {
            let mut quote: Option<char> = None;
            let mut chars = line.chars().peekable();
            while let Some(c) = chars.next() {
                match quote {
                    Some(_) if c == '\\' => {
                        chars.next();
                    }
                    Some(q) if c == q => {
                        quote = None;
                        out.push_str("\"\"");
                    }
                    Some(_) => {}
                    None if c == '\'' || c == '"' => quote = Some(c),
                    None if c == '-' && chars.peek() == Some(&'-') => break,
                    None => out.push(c),
                }
            }
            out.push('\n');
        }
        out
    }

    /// Returns the numeric literals of `code` that stand outside `[...]`.
    fn bare_numbers(code: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mut depth = 0usize;
        let mut prev = ' ';
        let mut chars = code.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '[' => depth += 1,
                ']' => depth = depth.saturating_sub(1),
                d if d.is_ascii_digit() && !(prev.is_ascii_alphanumeric() || prev == '_') => {
                    let mut n = d.to_string();
                    while let Some(&next) = chars.peek() {
                        if next.is_ascii_alphanumeric() || next == '.' {
                            n.push(next);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    if depth == 0 {
                        found.push(n);
                    }
                    prev = '0';
                    continue;
                }
                _ => {}
            }
            prev = c;
        }
        found
    }

    #[test]
    fn scripts_write_no_number_of_their_own() {
        for (file, source) in SOURCES {
            for n in bare_numbers(&code_of(source)) {
                let allowed = matches!(n.as_str(), "0" | "1" | "2")
                    || ARGUMENT_POSITIONS.contains(&(*file, n.as_str()));
                assert!(
                    allowed,
                    "{file} writes the number {n}: take it from the constants generated from Rust (redis/scripts.rs)"
                );
            }
        }
    }

    #[test]
    fn the_scan_finds_numbers_outside_indexes_only() {
        let code = code_of("local x = f[12] + 60000 -- 77\nlocal s = 'a 99'\nlocal y = ARGV[3]");
        assert_eq!(bare_numbers(&code), ["60000"]);
    }

    #[test]
    fn scripts_use_only_generated_names() {
        let generated = constants();
        let defined: Vec<&str> = generated
            .lines()
            .filter_map(|l| l.strip_prefix("local "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for (file, source) in SOURCES {
            let code = code_of(source);
            for word in code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let constant_like = word.len() > 1
                    && word.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && word
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    && word.contains('_');
                let local = matches!(word, "RETENTION" | "ARGV" | "NOW");
                assert!(
                    !constant_like || local || defined.contains(&word),
                    "{file} uses {word}, which the generated constants do not define"
                );
            }
        }
    }

    #[test]
    fn constants_carry_the_rust_values() {
        let c = constants();
        assert!(c.contains(&format!(
            "local QUARANTINE_AFTER = {}\n",
            policy::QUARANTINE_AFTER
        )));
        assert!(c.contains("local FAULT_WORKER_LOST = 'worker_lost'\n"));
        assert!(
            c.contains("local IS_FAULT = {[OUTCOME_FAILED] = true, [OUTCOME_EXPIRED] = true}\n")
        );
    }
}
