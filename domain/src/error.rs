//! Validation errors that name the field and the value.

use std::fmt;

/// A rejected input field: `path` names it the way the user wrote it
/// (`items[3].width`), `message` says what is wrong and quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// Where the field sits, for example `sweep.seed[2]` or `defaults.width`.
    pub path: String,
    /// What is wrong with it, quoting the value.
    pub message: String,
}

impl FieldError {
    /// Returns an error for the field at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Returns the same error with `prefix` put in front of its path.
    pub fn within(mut self, prefix: &str) -> Self {
        self.path = if self.path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}
