//! The wall clock the coordinator stamps its records with (attempt and event
//! times, usage days, the dashboard's "ago"): Unix milliseconds. The lease
//! deadlines run on each store's own clock, not on this one.

use std::time::{SystemTime, UNIX_EPOCH};

/// Returns the wall clock in Unix milliseconds (0 for a clock set before 1970).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
