//! The character classes of the web UI's regular expressions, which are
//! Python's for `str` patterns: `\s`, `\w` (and so `\b`) and `\d`.
//!
//! They decide where `BREAK` and `AND` are words and what a weight's digits
//! are, so kiln reads them as Python does rather than as Rust's `char`
//! methods would.

use unicode_categories::UnicodeCategories;

/// Python's `\s`: Unicode white space, plus the four information separators
/// U+001C–U+001F that `str.isspace` also counts.
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w`: letters and numbers of every script (`str.isalnum`) and `_`.
///
/// Rust's `is_alphanumeric` also counts the combining marks and symbols that
/// carry the `Alphabetic` property (Devanagari vowel signs, circled letters);
/// Python does not, so they are taken out.
pub(crate) fn is_word(c: char) -> bool {
    c == '_' || (c.is_alphanumeric() && !c.is_mark() && !c.is_symbol())
}

/// Python's `\d`: a decimal digit of any script (Unicode category `Nd`).
pub(crate) fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_number_decimal_digit())
}

/// The value of a [`is_digit`] character, as Python's `float` reads it.
///
/// Unicode encodes every script's decimal digits as runs of ten, zero first,
/// so the value is the distance from the start of the run of `Nd` characters
/// around `c`, modulo ten (some scripts' runs follow each other directly).
pub(crate) fn digit_value(c: char) -> Option<u32> {
    if c.is_ascii_digit() {
        return c.to_digit(10);
    }
    if !is_digit(c) {
        return None;
    }
    let mut start = c as u32;
    while let Some(previous) = start.checked_sub(1).and_then(char::from_u32) {
        if !is_digit(previous) || previous.is_ascii() {
            break;
        }
        start -= 1;
    }
    Some((c as u32 - start) % 10)
}

/// True when `text[at..]` starts with `word` standing as a word of its own:
/// Python's `\bWORD\b`, for a `word` made of word characters.
pub(crate) fn word_at(text: &str, at: usize, word: &str) -> bool {
    text[at..].starts_with(word)
        && text[..at].chars().next_back().is_none_or(|c| !is_word(c))
        && text[at + word.len()..]
            .chars()
            .next()
            .is_none_or(|c| !is_word(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_python() {
        // str.isspace: the information separators count, the zero-width space does not.
        assert!(is_space('\u{1f}') && is_space('\u{3000}') && is_space('\u{85}'));
        assert!(!is_space('\u{200b}') && !is_space('x'));
        // \w: letters and numbers of any script and `_`; not marks or symbols.
        assert!(is_word('é') && is_word('猫') && is_word('_') && is_word('٣') && is_word('²'));
        assert!(!is_word('\u{93e}'), "a Devanagari vowel sign is a mark");
        assert!(!is_word('Ⓐ'), "a circled letter is a symbol");
        assert!(!is_word('-') && !is_word(' '));
        // \d: Nd only, with its value.
        assert_eq!(digit_value('7'), Some(7));
        assert_eq!(digit_value('٣'), Some(3), "Arabic-Indic three");
        assert_eq!(digit_value('३'), Some(3), "Devanagari three");
        assert_eq!(
            digit_value('\u{1d7d9}'),
            Some(1),
            "mathematical double-struck one"
        );
        assert_eq!(digit_value('²'), None, "a superscript is No, not Nd");
        assert_eq!(digit_value('①'), None);
        assert!(word_at("a BREAK b", 2, "BREAK"));
        assert!(!word_at("aBREAK b", 1, "BREAK"));
        assert!(!word_at("a BREAKS", 2, "BREAK"));
        assert!(word_at("BREAK", 0, "BREAK"));
    }
}
