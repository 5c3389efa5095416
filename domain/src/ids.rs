//! Identifier newtypes, so a job id is never passed where a task id belongs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{FieldError, quote};

/// Identifies a job: a UUIDv7, so ids sort by submission time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub Uuid);

/// Identifies one task (one image) of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub Uuid);

/// Identifies a worker; chosen by the worker, stable across its reconnects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub String);

/// The fencing token of a lease: incremented on every claim and every reap of a task.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl JobId {
    /// Returns a fresh, time-ordered job id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses the `field` of a request as a job id.
    pub fn parse_field(field: &str, value: &str) -> Result<Self, FieldError> {
        value
            .parse()
            .map_err(|_| FieldError::new(field, format!("not a job id: {}", quote(value))))
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskId {
    /// Returns a fresh, time-ordered task id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses the `field` of a request as a task id.
    pub fn parse_field(field: &str, value: &str) -> Result<Self, FieldError> {
        value
            .parse()
            .map_err(|_| FieldError::new(field, format!("not a task id: {}", quote(value))))
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerId {
    /// Checks a worker id from a request: non-empty, printable, at most 128 bytes.
    pub fn parse_field(field: &str, value: &str) -> Result<Self, FieldError> {
        if value.is_empty() {
            return Err(FieldError::new(field, "must not be empty"));
        }
        if value.len() > 128 || value.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(FieldError::new(
                field,
                format!(
                    "must be at most 128 printable characters without spaces, got {}",
                    quote(value)
                ),
            ));
        }
        Ok(Self(value.to_string()))
    }

    /// Returns the id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Epoch {
    /// Returns the next epoch.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_id_is_not_echoed_whole() {
        let huge = "x".repeat(100_000);
        for e in [
            JobId::parse_field("job_id", &huge).unwrap_err(),
            TaskId::parse_field("task_id", &huge).unwrap_err(),
            WorkerId::parse_field("worker_id", &huge).unwrap_err(),
        ] {
            assert!(e.message.len() < 400, "{} bytes", e.message.len());
            assert!(e.message.contains("(100000 bytes)"), "{}", e.message);
        }
    }
}
