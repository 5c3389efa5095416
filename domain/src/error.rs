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

/// Most characters of a user's value an error message quotes: enough to
/// recognise it, and well under gRPC's 16 KiB limit on a status message
/// however many values one message quotes.
pub const MAX_QUOTED_CHARS: usize = 200;

/// Returns `value` quoted for an error message (`"…"`, escaped as Rust's
/// `{:?}` does), cut after [`MAX_QUOTED_CHARS`] characters of the escaped
/// text with the full length said, so a 100 KB value never comes back whole.
/// The cut is counted after escaping: an escape such as `\u{1e}` makes one
/// character of the value six of the message.
pub fn quote(value: &str) -> String {
    let mut shown = 0;
    let mut end = value.len();
    for (i, c) in value.char_indices() {
        shown += c.escape_debug().count();
        if shown > MAX_QUOTED_CHARS {
            end = i;
            break;
        }
    }
    if end == value.len() {
        format!("{value:?}")
    } else {
        format!("{:?}… ({} bytes)", &value[..end], value.len())
    }
}

/// Returns `text` fit for a one-line refusal or log line: control
/// characters escaped as `\n`, `\u{1b}` (a quoted TOML key, and so a field
/// path, may hold a line break or a terminal escape), and cut after `max`
/// characters (marked with `…`) when given (a key may be as long as the file).
pub fn one_line(text: &str, max: Option<usize>) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.chars().enumerate() {
        if max == Some(i) {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Most characters of a user's name a field path keeps (`sweep.NAME`,
/// `series.NAME`): names are checked after the path naming them is built,
/// so an over-long one must not make every message about it long too.
pub const MAX_PATH_SEGMENT_CHARS: usize = 64;

/// Returns `name` as a segment of a field path, cut after
/// [`MAX_PATH_SEGMENT_CHARS`] characters (marked with `…`).
pub fn segment(name: &str) -> String {
    match name.char_indices().nth(MAX_PATH_SEGMENT_CHARS) {
        None => name.to_string(),
        Some((cut, _)) => format!("{}…", &name[..cut]),
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_bounded() {
        assert_eq!(quote("fox"), "\"fox\"");
        assert_eq!(quote("a\u{0}b"), "\"a\\0b\"");
        let long = "x".repeat(100_000);
        let q = quote(&long);
        assert!(q.len() < MAX_QUOTED_CHARS + 40, "{}", q.len());
        assert!(q.ends_with("… (100000 bytes)"), "{q}");
        let wide = "é".repeat(MAX_QUOTED_CHARS + 1);
        assert!(quote(&wide).contains("bytes)"));
        assert_eq!(
            quote(&"x".repeat(MAX_QUOTED_CHARS)).len(),
            MAX_QUOTED_CHARS + 2
        );
        // Found by the `spec` fuzz target: 200 control characters, each
        // escaped as `\u{1e}`, made a quote of 1,200 bytes.
        let controls = quote(&"\u{1e}".repeat(MAX_QUOTED_CHARS));
        assert!(controls.len() < MAX_QUOTED_CHARS + 40, "{}", controls.len());
        assert!(controls.starts_with("\"\\u{1e}"), "{controls}");
        assert!(controls.ends_with("… (200 bytes)"), "{controls}");
        assert_eq!(segment("prompt"), "prompt");
        let name = segment(&"é".repeat(10_000));
        assert_eq!(name.chars().count(), MAX_PATH_SEGMENT_CHARS + 1);
        assert!(name.ends_with('…'));
    }

    #[test]
    fn one_line_escapes_control_characters_and_cuts() {
        assert_eq!(one_line("a\nb\u{1b}[2J", None), "a\\nb\\u{1b}[2J");
        assert_eq!(one_line("abcdef", Some(3)), "abc…");
        assert_eq!(one_line("abc", Some(3)), "abc");
    }
}
