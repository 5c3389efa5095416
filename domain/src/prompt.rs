//! AUTOMATIC1111 prompt weighting: parsing `(word:1.3)`, `(word)`, `[word]`,
//! escapes and `BREAK` into weighted spans, and laying tokens out in encoder
//! chunks.
//!
//! The coordinator calls [`parse_field`] at submission so a malformed weight is
//! an `INVALID_ARGUMENT` naming the field; the worker applies the weights of
//! [`parse`]'s spans to the token embeddings, and `kiln prompt` shows them. All
//! three use this one parser, so what the user sees is what renders.
//!
//! The syntax follows `parse_prompt_attention` in the web UI's
//! `modules/prompt_parser.py`, including its leniency:
//!
//! - `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by
//!   1.1, `(text:1.3)` multiplies it by 1.3; nesting multiplies.
//! - `\(`, `\)`, `\[`, `\]` and `\\` are the literal characters; a backslash
//!   before anything else is dropped, as the web UI drops it.
//! - An unmatched `)` or `]` is literal text; a bracket never closed applies to
//!   the end of the prompt.
//! - `BREAK` in capitals, as a word of its own, ends the current encoder chunk
//!   (the whitespace around it is dropped). Unlike the web UI, a `BREAK`
//!   inside brackets still breaks (the web UI turns it into text weighted -1.1).
//! - `(text: 1.3 )` with spaces around the number is a weight, as in the web
//!   UI's current parser.
//!
//! Where kiln is stricter: the web UI reads `(word:abc)` as the text
//! `word:abc` at ×1.1 and crashes on `(word:1.2.3)`. kiln refuses both as a
//! malformed weight ([`PromptError`]): a colon inside round brackets followed
//! directly by a single word before the closing bracket is a weight the user
//! meant to write. A colon followed by a space and ordinary words, such as
//! `(style: watercolor)`, stays text, as does a colon outside round brackets.

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

/// A weight that is not a number, such as `(word:abc)`, or brackets whose
/// weights multiply past the largest `f64`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "malformed weight in {} at character {column}: {reason}",
    quote(fragment)
)]
pub struct PromptError {
    /// 1-based position, in characters, of the bracket that opens the fragment.
    pub column: usize,
    /// The offending bracketed text, as the user wrote it.
    pub fragment: String,
    /// What is wrong, quoting the weight.
    pub reason: String,
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

/// Parses a prompt into weighted text pieces and breaks.
///
/// Adjacent pieces of equal weight are merged and empty text is dropped, so an
/// empty prompt gives no pieces.
///
/// # Errors
/// [`PromptError`] for a malformed weight such as `(word:abc)` or `(word:1.2.3)`,
/// and for nested brackets whose weights multiply to infinity.
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

/// Parses the prompt of the field at `path` (`items[0].prompt`).
///
/// # Errors
/// A [`FieldError`] at `path` that quotes the malformed weight and says where it is.
pub fn parse_field(path: &str, prompt: &str) -> Result<Vec<Piece>, FieldError> {
    parse(prompt).map_err(|e| {
        FieldError::new(
            path,
            format!(
                "malformed weight {} at character {}: {}",
                quote(&e.fragment),
                e.column,
                e.reason
            ),
        )
    })
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

/// Python's `\w` for `str`: what `\b` in the web UI's `BREAK` pattern looks at.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
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
    fn colon(&mut self, i: usize) -> Result<usize, PromptError> {
        let src = self.src;
        let after = i + 1;
        let end = src[after..]
            .find(is_special)
            .map_or(src.len(), |n| after + n);
        if !src[end..].starts_with(')') {
            self.push_literal(":".into());
            return Ok(after);
        }
        let raw = &src[after..end];
        let value = raw.trim();
        if looks_numeric(value) {
            let Some(&(start, open)) = self.round.last() else {
                // `word:1.3)` with no open bracket is text in the web UI too.
                self.push_text(&src[i..=end]);
                return Ok(end + 1);
            };
            return match value.parse::<f64>() {
                Ok(weight) if weight.is_finite() => {
                    self.round.pop();
                    self.multiply(start, weight, open, end + 1)?;
                    Ok(end + 1)
                }
                _ => Err(self.malformed(open, end, value)),
            };
        }
        let word_like = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '+' | '-'));
        let starts_like_number =
            value.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c));
        let glued = !raw.starts_with(char::is_whitespace);
        if let Some(&(_, open)) = self.round.last()
            && word_like
            && (glued || starts_like_number)
        {
            return Err(self.malformed(open, end, value));
        }
        self.push_literal(":".into());
        Ok(after)
    }

    fn malformed(&self, open: usize, close: usize, value: &str) -> PromptError {
        PromptError {
            column: self.src[..open].chars().count() + 1,
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
                    return Err(PromptError {
                        column: self.src[..open].chars().count() + 1,
                        fragment: self.src[open..close].to_string(),
                        reason: "the nested weights multiply past the largest number".into(),
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
            let free_before = run[..b].chars().next_back().is_none_or(|c| !is_word(c));
            let free_after = run[e..].chars().next().is_none_or(|c| !is_word(c));
            if free_before && free_after {
                let left = run[start..b].trim_end();
                if !left.is_empty() {
                    self.push_literal(left.to_string());
                }
                self.out.push(Slot::Break);
                let rest = &run[e..];
                start = e + (rest.len() - rest.trim_start().len());
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

/// True for what the web UI's weight pattern `[+-]?[.\d]+` accepts.
fn looks_numeric(value: &str) -> bool {
    let digits = value.strip_prefix(['+', '-']).unwrap_or(value);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
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
    fn malformed_weights_are_errors_naming_the_fragment() {
        let table: &[(&str, &str, usize)] = &[
            ("a (red car:abc) here", "(red car:abc)", 3),
            ("(word:1.2.3)", "(word:1.2.3)", 1),
            ("(word:.)", "(word:.)", 1),
            ("(word: 1.3x)", "(word: 1.3x)", 1),
            ("(word:1e3)", "(word:1e3)", 1),
            ("((a) (b:x))", "(b:x)", 6),
            ("café (x:y)", "(x:y)", 6),
        ];
        for (input, fragment, column) in table {
            let e = parse(input).expect_err(input);
            assert_eq!(e.fragment, *fragment, "{input:?}");
            assert_eq!(e.column, *column, "{input:?}");
        }
        let e = parse_field("items[0].prompt", "a (red car:abc) here").unwrap_err();
        assert_eq!(e.path, "items[0].prompt");
        assert!(e.message.contains("\"(red car:abc)\""), "{e}");
        assert!(e.message.contains("\"abc\" is not a number"), "{e}");
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
