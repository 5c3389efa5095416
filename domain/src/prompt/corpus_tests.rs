//! A corpus of tricky prompts with the spans and schedules derived by hand
//! from the web UI's rules (`parse_prompt_attention`,
//! `get_learned_conditioning_prompt_schedules`), one group per rule.
//!
//! Spans are (text, weight) with ("BREAK", 0) for a break; x = 1.1.

use super::schedule::schedule;
use super::*;

const X: f64 = 1.1;

/// Checks the spans of `parse(input)`.
fn spans(input: &str, expected: &[(&str, f64)]) {
    let got: Vec<(String, f64)> = parse(input)
        .unwrap_or_else(|e| panic!("{input:?}: {e}"))
        .into_iter()
        .map(|p| match p {
            Piece::Text { text, weight } => (text, weight),
            Piece::Break => ("BREAK".to_string(), 0.0),
        })
        .collect();
    assert_eq!(got.len(), expected.len(), "{input:?}: got {got:?}");
    for ((text, weight), (want_text, want_weight)) in got.iter().zip(expected) {
        assert_eq!(text, want_text, "{input:?}: got {got:?}");
        assert!(
            (weight - want_weight).abs() < 1e-12,
            "{input:?}: {text:?} has weight {weight}, expected {want_weight}"
        );
    }
}

#[test]
fn nesting() {
    spans("((a))", &[("a", X * X)]);
    spans("(((a)))", &[("a", X * X * X)]);
    spans("[[[a]]]", &[("a", 1.0 / X / X / X)]);
    spans("([a] b)", &[("a", 1.0), (" b", X)]);
    spans("((a:2) b:3)", &[("a", 6.0), (" b", 3.0)]);
    spans("(a (b (c)))", &[("a ", X), ("b ", X * X), ("c", X * X * X)]);
    spans("[a (b) c]", &[("a ", 1.0 / X), ("b", 1.0), (" c", 1.0 / X)]);
    spans("(a)(b)", &[("ab", X)]);
    spans("(a:1.2)(b:1.2)", &[("ab", 1.2)]);
    spans("()", &[]);
    spans("[]", &[]);
    spans("(:1.5)", &[]);
}

#[test]
fn escapes() {
    spans(r"\(a\)", &[("(a)", 1.0)]);
    spans(r"\[a\]", &[("[a]", 1.0)]);
    spans(r"(\(a\))", &[("(a)", X)]);
    spans(r"a\\b", &[("a\\b", 1.0)]);
    spans(r"a\\(b)", &[("a\\", 1.0), ("b", X)]);
    spans(r"\a\b\c", &[("abc", 1.0)]);
    // `\:` is no escape: the backslash is dropped and the colon still weighs.
    spans(r"(a\:1.5)", &[("a", 1.5)]);
    spans(r"\:", &[(":", 1.0)]);
    spans("a\\", &[("a", 1.0)]);
    spans(r"\\\(", &[("\\(", 1.0)]);
}

#[test]
fn unbalanced_brackets() {
    spans("(a", &[("a", X)]);
    spans("((a)", &[("a", X * X)]);
    spans("(a [b", &[("a ", X), ("b", X / X)]);
    spans("a)", &[("a)", 1.0)]);
    spans("a]", &[("a]", 1.0)]);
    spans("(a]", &[("a]", X)]);
    spans("[a)", &[("a)", 1.0 / X)]);
    spans(")(a", &[(")", 1.0), ("a", X)]);
    spans("(a [b) c]", &[("a ", X), ("b", 1.0), (" c", 1.0 / X)]);
    // Unclosed: round brackets first, then square, each from where it opened.
    spans("[a (b", &[("a ", 1.0 / X), ("b", X / X)]);
}

#[test]
fn odd_weights() {
    spans("(a:0)", &[("a", 0.0)]);
    spans("(a:-0.5)", &[("a", -0.5)]);
    spans("(a:+2)", &[("a", 2.0)]);
    spans("(a:1.)", &[("a", 1.0)]);
    spans("(a:.25)", &[("a", 0.25)]);
    spans("(a:007)", &[("a", 7.0)]);
    spans("(a:\t2 )", &[("a", 2.0)]);
    spans("(a:\u{3000}2)", &[("a", 2.0)]);
    // What the weight pattern does not take is text; the bracket weighs 1.1.
    spans("(style:anime)", &[("style:anime", X)]);
    spans("(a:1e3)", &[("a:1e3", X)]);
    spans("(a:1,5)", &[("a:1,5", X)]);
    spans("(a:2x)", &[("a:2x", X)]);
    spans("(a:-)", &[("a:-", X)]);
    spans("(a:+-1)", &[("a:+-1", X)]);
    spans("(a: - 1)", &[("a: - 1", X)]);
    spans("(a:1 2)", &[("a:1 2", X)]);
    spans("(a:inf)", &[("a:inf", X)]);
    // Python's \d takes any script's digits and float reads them.
    spans("(a:٢)", &[("a", 2.0)]);
    spans("(a:१.५)", &[("a", 1.5)]);
    // A weight with no round bracket open is text.
    spans("a:1.5)", &[("a:1.5)", 1.0)]);
    spans("[a:1.5]", &[("a:1.5", 1.0 / X)]);
    // Refused where Python's float raises.
    for bad in ["(a:1.2.3)", "(a:.)", "(a:-.)", "(a:1..)", "(a:..5)"] {
        assert!(
            matches!(parse(bad), Err(PromptError::Weight { .. })),
            "{bad}"
        );
    }
}

#[test]
fn colons() {
    spans("a:b", &[("a:b", 1.0)]);
    spans("(a:b)", &[("a:b", X)]);
    spans("(a:b:2)", &[("a:b", 2.0)]);
    spans("(a::2)", &[("a:", 2.0)]);
    spans("(a:2:3)", &[("a:2", 3.0)]);
    spans("12:30 (noon)", &[("12:30 ", 1.0), ("noon", X)]);
    spans(":)", &[(":)", 1.0)]);
    spans("(:)", &[(":", X)]);
    spans("(a:(b:2))", &[("a:", X), ("b", 2.0 * X)]);
}

#[test]
fn breaks() {
    spans("a BREAK b", &[("a", 1.0), ("BREAK", 0.0), ("b", 1.0)]);
    spans("a\nBREAK\nb", &[("a", 1.0), ("BREAK", 0.0), ("b", 1.0)]);
    spans("a\u{1f}BREAK b", &[("a", 1.0), ("BREAK", 0.0), ("b", 1.0)]);
    spans("aBREAK b", &[("aBREAK b", 1.0)]);
    spans("éBREAK", &[("éBREAK", 1.0)]);
    spans("猫BREAK", &[("猫BREAK", 1.0)]);
    spans("a-BREAK-b", &[("a-", 1.0), ("BREAK", 0.0), ("-b", 1.0)]);
    spans("break Break", &[("break Break", 1.0)]);
    spans("BREAK_", &[("BREAK_", 1.0)]);
    spans("(a) BREAK (b)", &[("a", X), ("BREAK", 0.0), ("b", X)]);
    spans("a BREAK:b", &[("a", 1.0), ("BREAK", 0.0), (":b", 1.0)]);
    // kiln's one difference: a BREAK inside brackets still breaks (the web UI
    // reads the word "BREAK" at weight -1.1 there).
    spans("(a BREAK b)", &[("a", X), ("BREAK", 0.0), ("b", X)]);
    spans("[BREAK]", &[("BREAK", 0.0)]);
}

#[test]
fn unicode() {
    spans("(猫:1.2) と (犬)", &[("猫", 1.2), (" と ", 1.0), ("犬", X)]);
    spans("[café]", &[("café", 1.0 / X)]);
    spans("(🦊:0.5)", &[("🦊", 0.5)]);
    spans("ｆｕｌｌ（ｗｉｄｔｈ）", &[("ｆｕｌｌ（ｗｉｄｔｈ）", 1.0)]);
    spans("(a\u{200b}:1.5)", &[("a\u{200b}", 1.5)]);
}

/// Checks the schedule of `input` over `steps` as (until, text).
fn scheduled(input: &str, steps: u32, expected: &[(u32, &str)]) {
    let got: Vec<(u32, String)> = schedule(input, steps)
        .into_iter()
        .map(|s| (s.until, s.text))
        .collect();
    let want: Vec<(u32, String)> = expected.iter().map(|(u, t)| (*u, t.to_string())).collect();
    assert_eq!(got, want, "{input:?} over {steps} steps");
}

#[test]
fn editing_and_alternation() {
    scheduled(
        "a [dog:cat:0.5] in a [red|blue] car",
        4,
        &[
            (1, "a dog in a red car"),
            (2, "a dog in a blue car"),
            (3, "a cat in a red car"),
            (4, "a cat in a blue car"),
        ],
    );
    scheduled("[a:b:1][c:d:2]", 3, &[(1, "ac"), (2, "bc"), (3, "bd")]);
    scheduled("[a:b:0.34]", 3, &[(1, "a"), (3, "b")]);
    scheduled("[a:b:0.33]", 3, &[(3, "b")]);
    scheduled("([a:b:1]:1.5)", 2, &[(1, "(a:1.5)"), (2, "(b:1.5)")]);
    scheduled("[[a:b:1]|c]", 3, &[(1, "a"), (2, "c"), (3, "b")]);
    scheduled("[a|b|c]", 4, &[(1, "a"), (2, "b"), (3, "c"), (4, "a")]);
    scheduled("[a||]", 3, &[(1, "a"), (2, ""), (3, "")]);
    scheduled("[|a]", 2, &[(1, ""), (2, "a")]);
    scheduled("[a BREAK b:c:1]", 2, &[(1, "a BREAK b"), (2, "c")]);
    scheduled("[猫|犬]", 2, &[(1, "猫"), (2, "犬")]);
    // Not editing: no number, three colons, escaped bracket, no closing bracket.
    scheduled("[a:b]", 3, &[(3, "[a:b]")]);
    scheduled("[a:b:c:1]", 3, &[(3, "[a:b:c:1]")]);
    scheduled(r"\[a:b:1]", 3, &[(3, r"\[a:b:1]")]);
    scheduled("[a:b:1", 3, &[(3, "[a:b:1")]);
    scheduled("[a:b:٢]", 3, &[(3, "[a:b:٢]")]);
    // A `|` outside alternation: nothing is scheduled.
    scheduled("a|b [c:d:1]", 3, &[(3, "a|b [c:d:1]")]);
}
