//! AUTOMATIC1111 prompts as the web UI reads them: extra-network tags,
//! composable `AND`, prompt editing and alternation, weighting and `BREAK`,
//! and the layout of tokens in encoder chunks.
//!
//! [`prepare`] is the one way from a recipe's prompt to what the encoder reads,
//! in the web UI's order: `<lora:…>` tags out ([`crate::extras::strip`]), `AND`
//! refused, the schedule of editing and alternation worked out over the
//! recipe's steps ([`schedule`]), and each scheduled text parsed for weights
//! ([`parse`]). The coordinator runs it at submission through [`parse_field`],
//! so a prompt the worker cannot read is an `INVALID_ARGUMENT` naming the
//! field; the worker encodes its stages; `kiln prompt` shows them.
//!
//! Weighting follows `parse_prompt_attention` in the web UI's
//! `modules/prompt_parser.py` on every prompt the web UI accepts:
//!
//! - `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by
//!   1.1, `(text:1.3)` multiplies it by 1.3; nesting multiplies, innermost
//!   first. The weight is what the web UI's pattern `:\s*([+-]?[.\d]+)\s*\)`
//!   takes: spaces around it are allowed, an exponent is not, and a digit may
//!   be any script's decimal digit, as Python reads `\d`. Anything else after
//!   the colon is text: `(style:anime)` and `(a:1e3)` are the texts
//!   `style:anime` and `a:1e3` at weight 1.1.
//! - `\(`, `\)`, `\[`, `\]` and `\\` are the literal characters; a backslash
//!   before anything else is dropped.
//! - An unmatched `)` or `]` is literal text; a bracket never closed applies to
//!   the end of the prompt, round ones first.
//! - `BREAK` in capitals, as a word of its own, ends the current encoder chunk
//!   (the whitespace around it is dropped).
//!
//! Where kiln differs, and why:
//!
//! - `BREAK` inside brackets still breaks. The web UI multiplies its marker
//!   with the brackets' weights and then no longer recognises it, so it
//!   encodes the word "BREAK" at a negative weight (-1.1 inside `( )`): an
//!   accident of its implementation that no prompt means.
//! - A weight the web UI fails on, `(a:1.2.3)` or `(a:.)` (Python's `float`
//!   raises), and weights whose product is infinite, which the web UI would
//!   turn into NaN conditioning, are refused with [`PromptError::Weight`].
//! - `AND` (composable prompts, `a AND b:0.5`) is refused with
//!   [`PromptError::And`] in the prompt and the negative prompt alike (the web
//!   UI reads it as text in the negative prompt); it is never read as text.
//! - The web UI can move the words after a late comma to the next chunk
//!   (`comma_padding_backtrack`); kiln does not (see [`chunk`]).

mod chars;
#[cfg(test)]
mod corpus_tests;
pub mod schedule;

use serde::Serialize;

use crate::error::{FieldError, quote};

/// Weight factor of one pair of round brackets, `(text)`.
pub const ROUND_MULTIPLIER: f64 = 1.1;
/// Weight factor of one pair of square brackets, `[text]`.
pub const SQUARE_MULTIPLIER: f64 = 1.0 / 1.1;
/// The keyword that ends an encoder chunk.
pub const BREAK: &str = "BREAK";

/// One piece of a parsed prompt.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Piece {
    /// Text that the encoder reads with its tokens' embeddings scaled by `weight`.
    Text {
        /// The literal text, escapes resolved.
        text: String,
        /// The product of the brackets around it; 1.0 outside any.
        weight: f64,
    },
    /// `BREAK`: the text after it starts a new encoder chunk.
    Break,
}

impl Piece {
    /// Returns a text piece.
    pub fn text(text: impl Into<String>, weight: f64) -> Self {
        Piece::Text {
            text: text.into(),
            weight,
        }
    }
}

/// A prompt kiln cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    /// A weight that is not a number Python reads, such as `(word:1.2.3)`, or
    /// brackets whose weights multiply past the largest `f64`.
    #[error("{}", weight_message(fragment, *column, reason))]
    Weight {
        /// 1-based position, in characters, of the bracket that opens the
        /// fragment in the prompt as written; `None` when prompt editing
        /// assembled the fragment from several places.
        column: Option<usize>,
        /// The offending bracketed text.
        fragment: String,
        /// What is wrong, quoting the weight.
        reason: String,
    },
    /// The web UI's `AND` of composable prompts, which kiln does not support.
    #[error(
        "`AND` at character {column} combines prompts (A1111's composable prompts), which kiln \
         does not support; write `and` for the word"
    )]
    And {
        /// 1-based position, in characters, of `AND` in the prompt.
        column: usize,
    },
}

/// The message of [`PromptError::Weight`].
fn weight_message(fragment: &str, column: Option<usize>, reason: &str) -> String {
    match column {
        Some(column) => format!(
            "malformed weight {} at character {column}: {reason}",
            quote(fragment)
        ),
        None => format!("malformed weight {}: {reason}", quote(fragment)),
    }
}

/// One stretch of a prepared prompt: the text and weights the encoder reads
/// while the sampler's step counter is at most `until`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    /// The web UI's `end_at_step` (see [`stage_at`]).
    pub until: u32,
    /// The scheduled text, weighting syntax still in it.
    pub text: String,
    /// `text` parsed for weights.
    pub pieces: Vec<Piece>,
}

/// A token placed in an encoder chunk, with the weight of the span it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedToken<T> {
    /// The token (an id in the worker, its text in `kiln prompt`).
    pub token: T,
    /// The weight of its span.
    pub weight: f64,
}

/// The tokens of one encoder pass, without the bos/eos the encoder adds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Chunk<T> {
    /// At most `body` tokens (the window less bos and eos).
    pub tokens: Vec<WeightedToken<T>>,
    /// True when a `BREAK` ended the chunk rather than the window filling up.
    pub ended_by_break: bool,
}

/// Parses one prompt text for weights and breaks, as the web UI's
/// `parse_prompt_attention` does (no editing, no tags: see [`prepare`]).
///
/// Adjacent pieces of equal weight are merged and empty text is dropped, so an
/// empty prompt gives no pieces.
///
/// # Errors
/// [`PromptError::Weight`] for a weight Python's `float` refuses, such as
/// `(word:1.2.3)`, and for nested brackets whose weights multiply to infinity.
pub fn parse(prompt: &str) -> Result<Vec<Piece>, PromptError> {
    let mut parser = Parser {
        src: prompt,
        out: Vec::new(),
        round: Vec::new(),
        square: Vec::new(),
    };
    parser.run()?;
    Ok(merge(parser.out))
}

/// Prepares a recipe's prompt for the encoder over `steps` steps: extra-network
/// tags removed, `AND` refused, editing and alternation scheduled, and each
/// scheduled text parsed for weights. A prompt without editing is one stage.
///
/// # Errors
/// [`PromptError::And`] for composable prompts, [`PromptError::Weight`] for a
/// malformed weight in any stage.
pub fn prepare(prompt: &str, steps: u32) -> Result<Vec<Stage>, PromptError> {
    let text = crate::extras::strip(prompt);
    if let Some(at) = find_and(&text) {
        let column = find_and(prompt).unwrap_or(at);
        return Err(PromptError::And {
            column: prompt[..column.min(prompt.len())].chars().count() + 1,
        });
    }
    schedule::schedule(&text, steps)
        .into_iter()
        .map(|s| {
            let pieces = parse(&s.text).map_err(|e| match e {
                PromptError::Weight {
                    fragment, reason, ..
                } => PromptError::Weight {
                    column: prompt
                        .find(&fragment)
                        .map(|at| prompt[..at].chars().count() + 1),
                    fragment,
                    reason,
                },
                other => other,
            })?;
            Ok(Stage {
                until: s.until,
                text: s.text,
                pieces,
            })
        })
        .collect()
}

/// Returns the index of the stage that holds at step counter `counter` (0 for
/// the first UNet call): the first whose `until` is at least `counter`, as the
/// web UI's `reconstruct_cond_batch` picks it; the last one past the end.
///
/// So `[a:b:5]` at 10 steps reads `a` for six calls (counters 0 to 5) and `b`
/// for four, and `[a|b]` reads `a`, `a`, `b`, `a`, `b`, …: the web UI compares
/// its 0-based counter with 1-based step numbers, and kiln keeps its reading.
pub fn stage_at(stages: &[Stage], counter: u32) -> usize {
    stages
        .iter()
        .position(|s| counter <= s.until)
        .unwrap_or(stages.len().saturating_sub(1))
}

/// The byte offset of the first `AND` standing as a word (the web UI's `\bAND\b`).
fn find_and(text: &str) -> Option<usize> {
    text.match_indices("AND")
        .map(|(at, _)| at)
        .find(|&at| chars::word_at(text, at, "AND"))
}

/// Prepares the prompt of the field at `path` (`items[0].prompt`) over `steps`.
///
/// # Errors
/// A [`FieldError`] at `path` that quotes the malformed weight and says where
/// it is, or says that `AND` is not supported.
pub fn parse_field(path: &str, prompt: &str, steps: u32) -> Result<Vec<Stage>, FieldError> {
    prepare(prompt, steps).map_err(|e| FieldError::new(path, e.to_string()))
}

/// Lays the pieces' tokens out in encoder chunks of at most `body` tokens
/// (75 for CLIP's 77-token window less bos and eos).
///
/// Each text piece is tokenized on its own, as the web UI does; a chunk is
/// closed when the next token would not fit, and a [`Piece::Break`] closes the
/// current chunk even when it is empty. There is always at least one chunk.
/// The web UI can also move the words after a late comma to the next chunk
/// (`comma_padding_backtrack`); kiln does not, so a long prompt is cut into
/// chunks at exactly `body` tokens.
///
/// # Errors
/// The first error of `tokenize`.
pub fn chunk<T, E>(
    pieces: &[Piece],
    body: usize,
    mut tokenize: impl FnMut(&str) -> Result<Vec<T>, E>,
) -> Result<Vec<Chunk<T>>, E> {
    let body = body.max(1);
    let mut chunks = Vec::new();
    let mut current: Vec<WeightedToken<T>> = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Break => chunks.push(Chunk {
                tokens: std::mem::take(&mut current),
                ended_by_break: true,
            }),
            Piece::Text { text, weight } => {
                for token in tokenize(text)? {
                    if current.len() == body {
                        chunks.push(Chunk {
                            tokens: std::mem::take(&mut current),
                            ended_by_break: false,
                        });
                    }
                    current.push(WeightedToken {
                        token,
                        weight: *weight,
                    });
                }
            }
        }
    }
    if !current.is_empty() || chunks.is_empty() {
        chunks.push(Chunk {
            tokens: current,
            ended_by_break: false,
        });
    }
    Ok(chunks)
}

/// Returns the prompt with brackets, weights and breaks taken out: what the
/// encoder reads, for caches and logs.
pub fn plain_text(pieces: &[Piece]) -> String {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text { text, .. } => out.push_str(text),
            Piece::Break => {
                if !out.is_empty() && !out.ends_with(char::is_whitespace) {
                    out.push(' ');
                }
            }
        }
    }
    out
}

/// One entry of the parse before merging.
enum Slot {
    Text(String, f64),
    Break,
}

/// The parser state: what `parse_prompt_attention` keeps, plus byte offsets of
/// the open round brackets for error messages.
struct Parser<'a> {
    src: &'a str,
    out: Vec<Slot>,
    /// Open round brackets: (index into `out` where the group starts, byte offset).
    round: Vec<(usize, usize)>,
    /// Open square brackets: (index into `out` where the group starts, byte offset).
    square: Vec<(usize, usize)>,
}

/// Characters that end a run of plain text.
fn is_special(c: char) -> bool {
    matches!(c, '\\' | '(' | ')' | '[' | ']' | ':')
}

impl Parser<'_> {
    fn run(&mut self) -> Result<(), PromptError> {
        let src = self.src;
        let mut i = 0;
        while let Some(c) = src[i..].chars().next() {
            match c {
                '\\' => {
                    let next = src[i + 1..].chars().next();
                    match next {
                        Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                            self.push_literal(n.to_string());
                            i += 1 + n.len_utf8();
                        }
                        // A lone backslash is dropped, as the web UI does.
                        _ => i += 1,
                    }
                }
                '(' => {
                    self.round.push((self.out.len(), i));
                    i += 1;
                }
                '[' => {
                    self.square.push((self.out.len(), i));
                    i += 1;
                }
                ')' => {
                    match self.round.pop() {
                        Some((start, open)) => {
                            self.multiply(start, ROUND_MULTIPLIER, open, i + 1)?;
                        }
                        None => self.push_literal(")".into()),
                    }
                    i += 1;
                }
                ']' => {
                    match self.square.pop() {
                        Some((start, open)) => {
                            self.multiply(start, SQUARE_MULTIPLIER, open, i + 1)?;
                        }
                        None => self.push_literal("]".into()),
                    }
                    i += 1;
                }
                ':' => i = self.colon(i)?,
                _ => {
                    let end = src[i..].find(is_special).map_or(src.len(), |n| i + n);
                    self.push_text(&src[i..end]);
                    i = end;
                }
            }
        }
        // Brackets never closed apply to the end, round ones first, as in the web UI.
        for (start, open) in std::mem::take(&mut self.round) {
            self.multiply(start, ROUND_MULTIPLIER, open, src.len())?;
        }
        for (start, open) in std::mem::take(&mut self.square) {
            self.multiply(start, SQUARE_MULTIPLIER, open, src.len())?;
        }
        Ok(())
    }

    /// Handles the `:` at byte `i`; returns where parsing goes on.
    ///
    /// The web UI's weight pattern is `:\s*([+-]?[.\d]+)\s*\)`. When it matches
    /// and a round bracket is open, it closes that bracket with the weight (or is
    /// refused, where Python's `float` would raise); when it matches with no
    /// round bracket open, it is text; otherwise the colon alone is text.
    fn colon(&mut self, i: usize) -> Result<usize, PromptError> {
        let src = self.src;
        let skip_space = |mut at: usize| {
            while let Some(c) = src[at..].chars().next().filter(|&c| chars::is_space(c)) {
                at += c.len_utf8();
            }
            at
        };
        let number = skip_space(i + 1);
        let mut end = number;
        if src[end..].starts_with(['+', '-']) {
            end += 1;
        }
        let digits = end;
        while let Some(c) = src[end..]
            .chars()
            .next()
            .filter(|&c| c == '.' || chars::is_digit(c))
        {
            end += c.len_utf8();
        }
        let close = skip_space(end);
        if end == digits || !src[close..].starts_with(')') {
            self.push_literal(":".into());
            return Ok(i + 1);
        }
        let Some(&(start, open)) = self.round.last() else {
            // `word:1.3)` with no open bracket is text in the web UI too.
            self.push_text(&src[i..=close]);
            return Ok(close + 1);
        };
        let raw = &src[number..end];
        match python_float(raw) {
            Some(weight) => {
                self.round.pop();
                self.multiply(start, weight, open, close + 1)?;
                Ok(close + 1)
            }
            None => Err(self.malformed(open, close, raw)),
        }
    }

    fn malformed(&self, open: usize, close: usize, value: &str) -> PromptError {
        PromptError::Weight {
            column: Some(self.src[..open].chars().count() + 1),
            fragment: self.src[open..=close].to_string(),
            reason: format!(
                "{} is not a number; write a weight like (text:1.3)",
                quote(value)
            ),
        }
    }

    /// Multiplies the weight of every text entry from `start` on, for the
    /// brackets at bytes `open..close`.
    ///
    /// Each weight is finite, but nested ones multiply: `((a:1e200):1e200)`
    /// or thousands of `(` reach infinity, which would turn the encoder's
    /// embeddings into NaN, so such a product is refused.
    fn multiply(
        &mut self,
        start: usize,
        factor: f64,
        open: usize,
        close: usize,
    ) -> Result<(), PromptError> {
        for slot in &mut self.out[start..] {
            if let Slot::Text(_, weight) = slot {
                *weight *= factor;
                if !weight.is_finite() {
                    return Err(PromptError::Weight {
                        column: Some(self.src[..open].chars().count() + 1),
                        fragment: self.src[open..close].to_string(),
                        reason: "the weights multiply past the largest number".into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Appends text that is not searched for `BREAK` (escapes, stray brackets).
    fn push_literal(&mut self, text: String) {
        self.out.push(Slot::Text(text, 1.0));
    }

    /// Appends a run of plain text, splitting it at each `BREAK` word and
    /// dropping the whitespace around it (the web UI's `\s*\bBREAK\b\s*`).
    fn push_text(&mut self, run: &str) {
        let mut start = 0;
        let mut search = 0;
        while let Some(offset) = run[search..].find(BREAK) {
            let b = search + offset;
            let e = b + BREAK.len();
            if chars::word_at(run, b, BREAK) {
                let left = run[start..b].trim_end_matches(chars::is_space);
                if !left.is_empty() {
                    self.push_literal(left.to_string());
                }
                self.out.push(Slot::Break);
                let rest = &run[e..];
                start = e + (rest.len() - rest.trim_start_matches(chars::is_space).len());
                search = start;
            } else {
                // 'B' is one byte, so this stays on a character boundary.
                search = b + 1;
            }
        }
        if start < run.len() {
            self.push_literal(run[start..].to_string());
        }
    }
}

/// Python's `float` of what the weight pattern `[+-]?[.\d]+` took: `None` for
/// more than one point or no digit (where Python raises). Digits of other
/// scripts count by their value, as `float` reads them.
fn python_float(raw: &str) -> Option<f64> {
    let (sign, body) = match raw.strip_prefix(['+', '-']) {
        Some(rest) => (&raw[..1], rest),
        None => ("", raw),
    };
    let mut ascii = String::from(sign);
    for c in body.chars() {
        match c {
            '.' => ascii.push('.'),
            _ => ascii.push(char::from_digit(chars::digit_value(c)?, 10)?),
        }
    }
    let points = body.matches('.').count();
    let has_digit = body.chars().any(|c| c != '.');
    (points <= 1 && has_digit)
        .then(|| ascii.parse().ok())
        .flatten()
}

/// Drops empty text and merges neighbours of equal weight (breaks stay).
fn merge(slots: Vec<Slot>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(slots.len());
    for slot in slots {
        match slot {
            Slot::Break => out.push(Piece::Break),
            Slot::Text(text, _) if text.is_empty() => {}
            Slot::Text(text, weight) => match out.last_mut() {
                Some(Piece::Text {
                    text: last,
                    weight: w,
                }) if *w == weight => last.push_str(&text),
                _ => out.push(Piece::Text { text, weight }),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(pieces: &[Piece]) -> Vec<(String, f64)> {
        pieces
            .iter()
            .map(|p| match p {
                Piece::Text { text, weight } => (text.clone(), *weight),
                Piece::Break => ("BREAK".to_string(), 0.0),
            })
            .collect()
    }

    /// Checks spans as (text, weight), with ("BREAK", 0) for a break.
    fn check(input: &str, expected: &[(&str, f64)]) {
        let got = spans(&parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}")));
        assert_eq!(got.len(), expected.len(), "{input:?}: got {got:?}");
        for ((text, weight), (want_text, want_weight)) in got.iter().zip(expected) {
            assert_eq!(text, want_text, "{input:?}: got {got:?}");
            assert!(
                (weight - want_weight).abs() < 1e-9,
                "{input:?}: {text:?} has weight {weight}, expected {want_weight}"
            );
        }
    }

    #[test]
    fn table_of_prompts_and_spans() {
        let x = 1.1;
        let table: Vec<(&str, Vec<(&str, f64)>)> = vec![
            ("", vec![]),
            ("normal text", vec![("normal text", 1.0)]),
            (
                "an (important) word",
                vec![("an ", 1.0), ("important", x), (" word", 1.0)],
            ),
            ("(word:1.3)", vec![("word", 1.3)]),
            ("(word: 1.3 )", vec![("word", 1.3)]),
            ("(word:.5)", vec![("word", 0.5)]),
            ("(word:-1)", vec![("word", -1.0)]),
            ("[word]", vec![("word", 1.0 / x)]),
            ("((word))", vec![("word", x * x)]),
            ("[[word]]", vec![("word", 1.0 / x / x)]),
            ("([word])", vec![("word", 1.0)]),
            ("((word:1.5))", vec![("word", 1.5 * x)]),
            ("(a (b:2) c)", vec![("a ", x), ("b", 2.0 * x), (" c", x)]),
            // The web UI's own doctests.
            ("(unbalanced", vec![("unbalanced", x)]),
            ("\\(literal\\]", vec![("(literal]", 1.0)]),
            ("(unnecessary)(parens)", vec![("unnecessaryparens", x)]),
            (
                "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                vec![
                    ("a ", 1.0),
                    ("house", 1.3 * x * x),
                    (" ", x),
                    ("on", 1.0),
                    (" a ", x),
                    ("hill", 0.55),
                    (", sun, ", x),
                    ("sky", x * x * x * x),
                    (".", x),
                ],
            ),
            // Escapes.
            ("\\\\", vec![("\\", 1.0)]),
            ("a \\(b\\) c", vec![("a (b) c", 1.0)]),
            ("(\\(b\\))", vec![("(b)", x)]),
            ("a\\b", vec![("ab", 1.0)]),
            // Unmatched closers are text; unclosed openers run to the end.
            ("a) b]", vec![("a) b]", 1.0)]),
            ("[a", vec![("a", 1.0 / x)]),
            // Colons that are not weights.
            ("time 10:30", vec![("time 10:30", 1.0)]),
            ("(style: watercolor)", vec![("style: watercolor", x)]),
            ("(ratio 16:9 wide)", vec![("ratio 16:9 wide", x)]),
            ("word:1.3)", vec![("word:1.3)", 1.0)]),
            ("(a:b:2)", vec![("a:b", 2.0)]),
            ("(smile :)", vec![("smile :", x)]),
            // What the weight pattern does not take is text at 1.1.
            ("(style:anime)", vec![("style:anime", x)]),
            ("(a:1e3)", vec![("a:1e3", x)]),
            ("(word: 1.3x)", vec![("word: 1.3x", x)]),
            ("(red car:abc)", vec![("red car:abc", x)]),
            // BREAK.
            (
                "a cat BREAK a dog",
                vec![("a cat", 1.0), ("BREAK", 0.0), ("a dog", 1.0)],
            ),
            ("a,BREAK,b", vec![("a,", 1.0), ("BREAK", 0.0), (",b", 1.0)]),
            (
                "BREAKFAST Break xBREAK",
                vec![("BREAKFAST Break xBREAK", 1.0)],
            ),
            ("BREAK a", vec![("BREAK", 0.0), ("a", 1.0)]),
            (
                "a BREAK BREAK b",
                vec![("a", 1.0), ("BREAK", 0.0), ("BREAK", 0.0), ("b", 1.0)],
            ),
            (
                "(red BREAK car)",
                vec![("red", x), ("BREAK", 0.0), ("car", x)],
            ),
            ("\\BREAK", vec![("BREAK", 0.0)]),
        ];
        for (input, expected) in &table {
            check(input, expected);
        }
    }

    #[test]
    fn nested_weights_multiply_in_the_web_uis_order() {
        // Bit for bit what the web UI's doctest prints: (1.3 * 1.1) * 1.1.
        let pieces = parse("(((house:1.3)))").unwrap();
        assert_eq!(pieces, [Piece::text("house", 1.5730000000000004)]);
    }

    #[test]
    fn weights_python_cannot_read_are_errors_naming_the_fragment() {
        let table: &[(&str, &str, usize)] = &[
            ("(word:1.2.3)", "(word:1.2.3)", 1),
            ("(word:.)", "(word:.)", 1),
            ("(word: -. )", "(word: -. )", 1),
            ("((a) (b:1..2))", "(b:1..2)", 6),
            ("café (x:1.2.3)", "(x:1.2.3)", 6),
        ];
        for (input, fragment, column) in table {
            match parse(input).expect_err(input) {
                PromptError::Weight {
                    fragment: f,
                    column: c,
                    ..
                } => {
                    assert_eq!(f, *fragment, "{input:?}");
                    assert_eq!(c, Some(*column), "{input:?}");
                }
                other => panic!("{input:?}: {other:?}"),
            }
        }
        let e = parse_field("items[0].prompt", "a (red car:1.2.3) here", 20).unwrap_err();
        assert_eq!(e.path, "items[0].prompt");
        assert!(
            e.message.contains("\"(red car:1.2.3)\" at character 3"),
            "{e}"
        );
        assert!(e.message.contains("\"1.2.3\" is not a number"), "{e}");
        // A fragment assembled by editing has no one place in the prompt.
        let e = parse_field("prompt", "(a:[1.2:1.3.4:2])", 4).unwrap_err();
        assert!(e.message.contains("\"(a:1.3.4)\": "), "{e}");
        // Only the stages the steps reach are read.
        assert!(parse_field("prompt", "[x:(a:1.2.3):5]", 5).is_ok());
        assert!(parse_field("prompt", "[x:(a:1.2.3):5]", 6).is_err());
    }

    #[test]
    fn and_is_refused_wherever_it_stands_as_a_word() {
        for (prompt, column) in [
            ("a cat AND a dog", 7),
            ("a cat AND a dog:0.5", 7),
            ("[x|AND]", 4),
            ("(AND)", 2),
            ("AND", 1),
            ("café AND", 6),
            ("a\\AND b", 3),
        ] {
            match prepare(prompt, 10) {
                Err(PromptError::And { column: c }) => assert_eq!(c, column, "{prompt:?}"),
                other => panic!("{prompt:?}: {other:?}"),
            }
        }
        for prompt in [
            "ANDROID",
            "BAND",
            "and",
            "And",
            "AND_x",
            "éAND",
            "<lora:AND:1> x",
        ] {
            assert!(prepare(prompt, 10).is_ok(), "{prompt:?}");
        }
        let e = parse_field("defaults.negative_prompt", "blurry AND dark", 10).unwrap_err();
        assert_eq!(e.path, "defaults.negative_prompt");
        assert!(e.message.contains("`AND` at character 8"), "{e}");
        assert!(e.message.contains("not support"), "{e}");
    }

    #[test]
    fn prepare_strips_tags_schedules_and_weights() {
        let stages = prepare("<lora:mira:0.8>a [(dog:1.2):cat:2] in [red|blue]", 4).unwrap();
        let got: Vec<(u32, &str, Vec<Piece>)> = stages
            .iter()
            .map(|s| (s.until, s.text.as_str(), s.pieces.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    1,
                    "a (dog:1.2) in red",
                    vec![
                        Piece::text("a ", 1.0),
                        Piece::text("dog", 1.2),
                        Piece::text(" in red", 1.0)
                    ]
                ),
                (
                    2,
                    "a (dog:1.2) in blue",
                    vec![
                        Piece::text("a ", 1.0),
                        Piece::text("dog", 1.2),
                        Piece::text(" in blue", 1.0)
                    ]
                ),
                (3, "a cat in red", vec![Piece::text("a cat in red", 1.0)]),
                (4, "a cat in blue", vec![Piece::text("a cat in blue", 1.0)]),
            ]
        );
        // Without editing: one stage, the prompt as written.
        let plain = prepare("a (red:1.3) car", 30).unwrap();
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].until, 30);
        assert_eq!(plain[0].pieces, parse("a (red:1.3) car").unwrap());
    }

    #[test]
    fn the_stage_at_a_counter_follows_the_web_ui() {
        let read = |prompt: &str, steps: u32| -> Vec<String> {
            let stages = prepare(prompt, steps).unwrap();
            (0..steps)
                .map(|c| stages[stage_at(&stages, c)].text.clone())
                .collect()
        };
        assert_eq!(
            read("[a:b:5]", 10),
            ["a", "a", "a", "a", "a", "a", "b", "b", "b", "b"]
        );
        assert_eq!(read("[a:b:0.5]", 4), ["a", "a", "a", "b"]);
        assert_eq!(read("[a|b]", 5), ["a", "a", "b", "a", "b"]);
        assert_eq!(read("[a:b:0]", 3), ["b", "b", "b"]);
        assert_eq!(read("[a:b:3]", 3), ["a", "a", "a"]);
        let stages = prepare("plain", 3).unwrap();
        assert_eq!(stage_at(&stages, 0), 0);
        assert_eq!(stage_at(&stages, 99), 0);
    }

    #[test]
    fn chunks_split_at_the_body_and_at_breaks() {
        let words = |t: &str| -> Result<Vec<String>, ()> {
            Ok(t.split_whitespace().map(str::to_string).collect())
        };
        let pieces = parse("a b (c d:2) e").unwrap();
        let chunks = chunk(&pieces, 2, words).unwrap();
        let layout: Vec<Vec<(&str, f64)>> = chunks
            .iter()
            .map(|c| {
                c.tokens
                    .iter()
                    .map(|t| (t.token.as_str(), t.weight))
                    .collect()
            })
            .collect();
        assert_eq!(
            layout,
            [
                vec![("a", 1.0), ("b", 1.0)],
                vec![("c", 2.0), ("d", 2.0)],
                vec![("e", 1.0)]
            ]
        );
        assert!(chunks.iter().all(|c| !c.ended_by_break));

        let chunks = chunk(&parse("a BREAK b").unwrap(), 75, words).unwrap();
        assert_eq!(chunks.len(), 2);
        assert!(chunks[0].ended_by_break);
        assert_eq!(chunks[1].tokens[0].token, "b");

        // A break at the start gives an empty first chunk; one at the end adds nothing.
        assert_eq!(
            chunk(&parse("BREAK a").unwrap(), 75, words).unwrap().len(),
            2
        );
        assert_eq!(
            chunk(&parse("a BREAK").unwrap(), 75, words).unwrap().len(),
            1
        );
        // Exactly a full window is one chunk; one more token opens a second.
        let full = vec!["w"; 75].join(" ");
        assert_eq!(chunk(&parse(&full).unwrap(), 75, words).unwrap().len(), 1);
        let over = format!("{full} w");
        assert_eq!(chunk(&parse(&over).unwrap(), 75, words).unwrap().len(), 2);
        // An empty prompt is one empty chunk.
        let empty = chunk(&parse("").unwrap(), 75, words).unwrap();
        assert_eq!(empty.len(), 1);
        assert!(empty[0].tokens.is_empty());
    }

    #[test]
    fn plain_text_drops_the_syntax() {
        let pieces = parse("a (red:1.2) [car] BREAK on a \\(hill\\)").unwrap();
        assert_eq!(plain_text(&pieces), "a red car on a (hill)");
    }
}
