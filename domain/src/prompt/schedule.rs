//! Prompt editing and alternation: which text a prompt stands for at each
//! step, as the web UI's `get_learned_conditioning_prompt_schedules` works it
//! out.
//!
//! - `[from:to:when]` reads `from` up to step `when` and `to` after it;
//!   `[to:when]` adds `to` after `when`, `[from::when]` drops `from` after it.
//!   `when` written with a decimal point is a fraction of the steps (`0.25`,
//!   `1.0`, `1.5e-1`), without one a step number (`10`, `1e1`); it is cut to
//!   a whole step (towards zero) and to at most the step count.
//! - `[a|b|c]` cycles through its options, one per step; an empty option is
//!   empty text.
//! - Both nest and both may stand inside weighting brackets; a weighting
//!   group keeps its brackets in the scheduled text, which is then parsed for
//!   weights on its own (`(x:[1.2:1.5:3])` is `(x:1.2)`, then `(x:1.5)`).
//!
//! The web UI parses this with a Lark grammar; kiln parses the same language
//! by hand. A bracket construct that does not parse (`[a:b:c:2]`, an
//! unclosed `[`) stays text as written, as the grammar's stray brackets do;
//! a `|` outside alternation brackets, or a `\` at the end or before a line
//! break, makes the whole prompt unparsable, and then, as in the web UI, the
//! prompt stands as written for every step.
//!
//! One difference: the grammar is ambiguous where a construct at the top level
//! is directly followed by stray brackets or colons (`[a:b:2]::`), and the web
//! UI's Earley parser then resolves it one way or the other depending on the
//! length of that run (`[a:b:2]:` is edited, `[a:b:2]::` is text). kiln always
//! reads the construct. Compared on 20 000 generated prompts with the web
//! UI's parser, the schedules differ only there.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;

use super::chars::is_space;

/// Brackets nested deeper than this make a prompt unparsable (it then stands
/// as written). The web UI's parser gives up far sooner: Python's recursion
/// limit stops it at a few hundred levels.
pub const MAX_DEPTH: usize = 64;

/// One stretch of a prompt's schedule: the text that holds up to a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduled {
    /// The web UI's `end_at_step`: the text holds while the sampler's step
    /// counter (0 for the first UNet call) is at most this.
    pub until: u32,
    /// The prompt text at those steps, weights and escapes still in it.
    pub text: String,
}

/// Returns the schedule of `prompt` over `steps` steps: one entry per step at
/// which the text may change, in order, the last one `until` `steps`.
///
/// A prompt without editing or alternation is one entry holding it as written.
pub fn schedule(prompt: &str, steps: u32) -> Vec<Scheduled> {
    let Some(nodes) = Parser::new(prompt).start() else {
        return vec![Scheduled {
            until: steps,
            text: prompt.to_string(),
        }];
    };
    let mut ends = vec![steps];
    collect(&nodes, steps, &mut ends);
    ends.sort_unstable();
    ends.dedup();
    ends.into_iter()
        .map(|until| {
            let mut text = String::with_capacity(prompt.len());
            render(&nodes, steps, until, &mut text);
            Scheduled { until, text }
        })
        .collect()
}

/// A parsed piece of prompt.
#[derive(Debug)]
enum Node<'a> {
    /// Text as written: plain text, escapes, whitespace, and the brackets and
    /// colons of weighting groups and of constructs that did not parse.
    Text(&'a str),
    /// `[before:after:when]`; `before` is empty for `[after:when]`.
    Edit {
        before: Vec<Node<'a>>,
        after: Vec<Node<'a>>,
        /// The number as written.
        when: &'a str,
    },
    /// `[a|b|…]`.
    Alternate(Vec<Vec<Node<'a>>>),
}

/// Appends the steps at which `nodes` may change text: each edit's step when
/// it is at least 1, every step when anything alternates.
fn collect(nodes: &[Node<'_>], steps: u32, ends: &mut Vec<u32>) {
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Edit {
                before,
                after,
                when,
            } => {
                let step = edit_step(when, steps);
                if step >= 1 {
                    ends.push(step as u32);
                }
                collect(before, steps, ends);
                collect(after, steps, ends);
            }
            Node::Alternate(options) => {
                ends.extend(1..=steps);
                for option in options {
                    collect(option, steps, ends);
                }
            }
        }
    }
}

/// Writes the text of `nodes` at schedule entry `until`.
fn render(nodes: &[Node<'_>], steps: u32, until: u32, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(text) => out.push_str(text),
            Node::Edit {
                before,
                after,
                when,
            } => {
                let chosen = if i64::from(until) <= edit_step(when, steps) {
                    before
                } else {
                    after
                };
                render(chosen, steps, until, out);
            }
            Node::Alternate(options) => {
                let index = (i64::from(until) - 1).rem_euclid(options.len() as i64) as usize;
                render(&options[index], steps, until, out);
            }
        }
    }
}

/// The step of an edit's `when`: with a decimal point a fraction of `steps`,
/// else a step number; towards zero, at most `steps`. (The web UI fails on a
/// number too large for an integer, such as `1e999`; kiln takes `steps`.)
fn edit_step(when: &str, steps: u32) -> i64 {
    // `when` matched the number grammar, so it parses; 0 is unreachable.
    let value: f64 = when.parse().unwrap_or(0.0);
    let value = if when.contains('.') {
        value * f64::from(steps)
    } else {
        value
    };
    if value >= f64::from(steps) {
        i64::from(steps)
    } else {
        // `as` saturates: a very negative number is i64::MIN, before every step.
        value.trunc() as i64
    }
}

/// A recursive-descent reading of the web UI's schedule grammar.
///
/// Inside a construct every bracket must belong to a construct; at the top
/// level a bracket that opens none that parses is text (the grammar's stray
/// brackets). Each construct has one reading from where it starts, so the
/// parse is deterministic; where the grammar is ambiguous between a construct
/// and stray brackets, the construct wins, as the web UI's parser picks it.
struct Parser<'a> {
    src: &'a str,
    /// Constructs open around the current position.
    depth: Cell<usize>,
    /// Set when a construct nests deeper than [`MAX_DEPTH`]: nothing parses.
    too_deep: Cell<bool>,
    /// Where a construct was tried and did not parse. Its reading does not
    /// depend on what surrounds it, so it is not tried again: without this,
    /// every unclosed `(` would rescan the rest of the prompt.
    failed: RefCell<HashSet<usize>>,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Self {
            src,
            depth: Cell::new(0),
            too_deep: Cell::new(false),
            failed: RefCell::new(HashSet::new()),
        }
    }

    /// Runs `parse` for the construct at `i` one level deeper, remembering a failure.
    fn construct<T>(&self, i: usize, parse: impl FnOnce() -> Option<T>) -> Option<T> {
        if self.too_deep.get() || self.failed.borrow().contains(&i) {
            return None;
        }
        if self.depth.get() >= MAX_DEPTH {
            self.too_deep.set(true);
            return None;
        }
        self.depth.set(self.depth.get() + 1);
        let result = parse();
        self.depth.set(self.depth.get() - 1);
        if result.is_none() && !self.too_deep.get() {
            self.failed.borrow_mut().insert(i);
        }
        result
    }

    /// The character at byte `i`.
    fn at(&self, i: usize) -> Option<char> {
        self.src[i..].chars().next()
    }

    /// Parses the whole prompt, or `None` when it has no reading.
    fn start(&self) -> Option<Vec<Node<'a>>> {
        let mut nodes = Vec::new();
        let mut i = 0;
        while i < self.src.len() {
            let (mut more, end) = self.prompt(i);
            if self.too_deep.get() {
                return None;
            }
            nodes.append(&mut more);
            i = end;
            let Some(c) = self.at(i) else { break };
            match c {
                // Stray brackets and colons are text; `(` and `[` get here
                // only when they open nothing that parses.
                '(' | ')' | '[' | ']' | ':' => {
                    nodes.push(Node::Text(&self.src[i..i + 1]));
                    i += 1;
                }
                // A `|` outside alternation, or a `\` with nothing to escape.
                _ => return None,
            }
        }
        Some(nodes)
    }

    /// Parses a run of text and constructs from byte `i`; returns it and where
    /// it stops: at the end, at `:`, `|`, `)`, `]`, at a `(` or `[` that opens
    /// nothing that parses, or at a `\` with nothing to escape.
    fn prompt(&self, mut i: usize) -> (Vec<Node<'a>>, usize) {
        let mut nodes = Vec::new();
        while let Some(c) = self.at(i) {
            match c {
                '(' => match self.round(i) {
                    Some((mut more, end)) => {
                        nodes.append(&mut more);
                        i = end;
                    }
                    None => break,
                },
                '[' => match self.square(i) {
                    Some((mut more, end)) => {
                        nodes.append(&mut more);
                        i = end;
                    }
                    None => break,
                },
                ':' | '|' | ')' | ']' => break,
                _ => {
                    let end = self.plain(i);
                    if end == i {
                        break;
                    }
                    nodes.push(Node::Text(&self.src[i..end]));
                    i = end;
                }
            }
        }
        (nodes, i)
    }

    /// The end of the plain text from `i`: anything but `\[]():|`, and `\`
    /// followed by any character but a line break.
    fn plain(&self, mut i: usize) -> usize {
        while let Some(c) = self.at(i) {
            match c {
                '\\' => match self.at(i + 1) {
                    Some(n) if n != '\n' => i += 1 + n.len_utf8(),
                    _ => break,
                },
                '[' | ']' | '(' | ')' | ':' | '|' => break,
                _ => i += c.len_utf8(),
            }
        }
        i
    }

    /// `(prompt)` or `(prompt:prompt)` at `i`: a weighting group, kept as text
    /// around what its prompts hold.
    fn round(&self, i: usize) -> Option<(Vec<Node<'a>>, usize)> {
        self.construct(i, || self.round_inner(i))
    }

    /// [`Self::round`] without the depth and failure bookkeeping.
    fn round_inner(&self, i: usize) -> Option<(Vec<Node<'a>>, usize)> {
        let mut nodes = vec![Node::Text(&self.src[i..i + 1])];
        let (mut inner, j) = self.prompt(i + 1);
        nodes.append(&mut inner);
        match self.at(j)? {
            ')' => {
                nodes.push(Node::Text(&self.src[j..j + 1]));
                Some((nodes, j + 1))
            }
            ':' => {
                nodes.push(Node::Text(&self.src[j..j + 1]));
                let (mut weight, k) = self.prompt(j + 1);
                (self.at(k)? == ')').then_some(())?;
                nodes.append(&mut weight);
                nodes.push(Node::Text(&self.src[k..k + 1]));
                Some((nodes, k + 1))
            }
            _ => None,
        }
    }

    /// `[prompt]`, `[a|b|…]`, `[to:when]` or `[from:to:when]` at `i`.
    fn square(&self, i: usize) -> Option<(Vec<Node<'a>>, usize)> {
        self.construct(i, || self.square_inner(i))
    }

    /// [`Self::square`] without the depth and failure bookkeeping.
    fn square_inner(&self, i: usize) -> Option<(Vec<Node<'a>>, usize)> {
        let (first, j) = self.prompt(i + 1);
        match self.at(j)? {
            ']' => {
                let mut nodes = vec![Node::Text(&self.src[i..i + 1])];
                nodes.extend(first);
                nodes.push(Node::Text(&self.src[j..j + 1]));
                Some((nodes, j + 1))
            }
            '|' => {
                let mut options = vec![first];
                let mut at = j;
                loop {
                    match self.at(at)? {
                        '|' => {
                            let (option, end) = self.prompt(at + 1);
                            options.push(option);
                            at = end;
                        }
                        ']' => return Some((vec![Node::Alternate(options)], at + 1)),
                        _ => return None,
                    }
                }
            }
            ':' => {
                if let Some((when, end)) = self.when(j + 1) {
                    return Some((
                        vec![Node::Edit {
                            before: Vec::new(),
                            after: first,
                            when,
                        }],
                        end,
                    ));
                }
                let (second, k) = self.prompt(j + 1);
                (self.at(k)? == ':').then_some(())?;
                let (when, end) = self.when(k + 1)?;
                Some((
                    vec![Node::Edit {
                        before: first,
                        after: second,
                        when,
                    }],
                    end,
                ))
            }
            _ => None,
        }
    }

    /// `[whitespace] NUMBER [whitespace] ]` at `i`: the number and the byte
    /// after the `]`. NUMBER is Lark's `SIGNED_NUMBER`: a sign, then digits
    /// with an optional fraction or a fraction alone, then an optional exponent.
    fn when(&self, i: usize) -> Option<(&'a str, usize)> {
        let bytes = self.src.as_bytes();
        let skip_space = |mut at: usize| {
            while let Some(c) = self.at(at).filter(|&c| is_space(c)) {
                at += c.len_utf8();
            }
            at
        };
        let digits = |at: usize| {
            at + bytes[at..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        let start = skip_space(i);
        let mut at = start;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let whole = digits(at);
        let mut end = whole;
        if bytes.get(whole) == Some(&b'.') {
            let fraction = digits(whole + 1);
            if whole > at || fraction > whole + 1 {
                end = fraction;
            }
        }
        if end == at {
            return None;
        }
        if matches!(bytes.get(end), Some(b'e' | b'E')) {
            let mut exp = end + 1;
            if matches!(bytes.get(exp), Some(b'+' | b'-')) {
                exp += 1;
            }
            let exp_end = digits(exp);
            if exp_end > exp {
                end = exp_end;
            }
        }
        let close = skip_space(end);
        (bytes.get(close) == Some(&b']')).then_some((&self.src[start..end], close + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(prompt: &str, steps: u32) -> Vec<(u32, String)> {
        schedule(prompt, steps)
            .into_iter()
            .map(|s| (s.until, s.text))
            .collect()
    }

    fn check(prompt: &str, steps: u32, expected: &[(u32, &str)]) {
        let want: Vec<(u32, String)> = expected.iter().map(|(u, t)| (*u, t.to_string())).collect();
        assert_eq!(table(prompt, steps), want, "{prompt:?} at {steps} steps");
    }

    #[test]
    fn the_web_uis_own_examples() {
        check("test", 10, &[(10, "test")]);
        check("a [b:3]", 10, &[(3, "a "), (10, "a b")]);
        check("a [b: 3]", 10, &[(3, "a "), (10, "a b")]);
        check("a [[[b]]:2]", 10, &[(2, "a "), (10, "a [[b]]")]);
        check("[(a:2):3]", 10, &[(3, ""), (10, "(a:2)")]);
        check("a [b : c : 1] d", 10, &[(1, "a b  d"), (10, "a  c  d")]);
        check(
            "a[b:[c:d:2]:1]e",
            10,
            &[(1, "abe"), (2, "ace"), (10, "ade")],
        );
        check("a [unbalanced", 10, &[(10, "a [unbalanced")]);
        check("a [b:.5] c", 10, &[(5, "a  c"), (10, "a b c")]);
        check(
            "((a][:b:c [d:3]",
            10,
            &[(3, "((a][:b:c "), (10, "((a][:b:c d")],
        );
        let alternating: Vec<(u32, &str)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "a" } else { "(b:1.1)" }))
            .collect();
        check("[a|(b:1.1)]", 10, &alternating);
        let female: Vec<(u32, &str)> = (1..=10)
            .map(|s| (s, if s % 2 == 1 { "female" } else { "male" }))
            .collect();
        check("[fe|]male", 10, &female);
        let four: Vec<(u32, &str)> = (1..=10)
            .map(|s| (s, if s % 4 == 1 { "female" } else { "male" }))
            .collect();
        check("[fe|||]male", 10, &four);
    }

    #[test]
    fn when_with_a_point_is_a_fraction_without_one_a_step() {
        check("[a:b:0.5]", 10, &[(5, "a"), (10, "b")]);
        check("[a:b:5]", 10, &[(5, "a"), (10, "b")]);
        check("[a:b:1.0]", 10, &[(10, "a")]);
        check("[a:b:1]", 10, &[(1, "a"), (10, "b")]);
        check("[a:b:5.]", 20, &[(20, "a")]);
        check("[a:b:.25]", 20, &[(5, "a"), (20, "b")]);
        check("[a:b:0.99]", 10, &[(9, "a"), (10, "b")]);
        check("[a:b:1e1]", 20, &[(10, "a"), (20, "b")]);
        check("[a:b:1.5e-1]", 20, &[(3, "a"), (20, "b")]);
        check("[a:b:+3]", 10, &[(3, "a"), (10, "b")]);
        // Edges: 0 and below are `to` from the start; the step count and past it `from` throughout.
        check("[a:b:0]", 10, &[(10, "b")]);
        check("[a:b:-2]", 10, &[(10, "b")]);
        check("[a:b:-.5]", 10, &[(10, "b")]);
        check("[a:b:10]", 10, &[(10, "a")]);
        check("[a:b:99]", 10, &[(10, "a")]);
        check("[a:b:1e999]", 10, &[(10, "a")]);
        check("[a:b: 4 ]", 10, &[(4, "a"), (10, "b")]);
        check("[a:b:\u{3000}4]", 10, &[(4, "a"), (10, "b")]);
    }

    #[test]
    fn forms_of_editing() {
        check("a [dog:cat:3] b", 6, &[(3, "a dog b"), (6, "a cat b")]);
        check("[from::2]x", 4, &[(2, "fromx"), (4, "x")]);
        check("[to:2]x", 4, &[(2, "x"), (4, "tox")]);
        check("[:b:2]", 4, &[(2, ""), (4, "b")]);
        check("[::2]", 4, &[(2, ""), (4, "")]);
        check(
            "[(x:1.2):[y:z:3]:1]",
            4,
            &[(1, "(x:1.2)"), (3, "y"), (4, "z")],
        );
        check("(x:[1.2:1.5:2])", 4, &[(2, "(x:1.2)"), (4, "(x:1.5)")]);
        check(
            "(red [car:bus:2])",
            4,
            &[(2, "(red car)"), (4, "(red bus)")],
        );
        check("[a|b]", 3, &[(1, "a"), (2, "b"), (3, "a")]);
        check("[a|[b|c]]", 4, &[(1, "a"), (2, "c"), (3, "a"), (4, "c")]);
        check("[[a|b]:c:2]", 3, &[(1, "a"), (2, "b"), (3, "c")]);
        check("\\[a:b:2\\]", 4, &[(4, "\\[a:b:2\\]")]);
        check("[a\\:b:c:2]", 4, &[(2, "a\\:b"), (4, "c")]);
        check("[a\\|b]", 4, &[(4, "[a\\|b]")]);
        check("[猫:犬:2]", 4, &[(2, "猫"), (4, "犬")]);
    }

    #[test]
    fn what_does_not_parse_stays_as_written() {
        // Constructs that do not parse are text; other constructs still count.
        check("[a:b:c:2]", 4, &[(4, "[a:b:c:2]")]);
        check("[a:b:2x]", 4, &[(4, "[a:b:2x]")]);
        check("[a:b:1e]", 4, &[(4, "[a:b:1e]")]);
        check("[a:b:.]", 4, &[(4, "[a:b:.]")]);
        check("[a:b:2", 4, &[(4, "[a:b:2")]);
        check("(a:b:c) [x:y:2]", 4, &[(2, "(a:b:c) x"), (4, "(a:b:c) y")]);
        check("[[a:b:2]", 4, &[(2, "[a"), (4, "[b")]);
        check("(a [x:y:2]", 4, &[(2, "(a x"), (4, "(a y")]);
        check("a) [x:y:2] ]", 4, &[(2, "a) x ]"), (4, "a) y ]")]);
        // A `|` outside alternation or a `\` with nothing after it: nothing parses.
        for p in [
            "a | b [x:y:2]",
            "[a:b|c]",
            "[a|b",
            "(a|b)",
            "[x:y:2] \\",
            "[x:y:2]\\\n",
        ] {
            check(p, 4, &[(4, p)]);
        }
        // Too deep to parse: as written.
        let deep = format!("{}[a:b:2]{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        check(&deep, 4, &[(4, &deep)]);
        let shallow = format!(
            "{}[a:b:2]{}",
            "(".repeat(MAX_DEPTH - 1),
            ")".repeat(MAX_DEPTH - 1)
        );
        assert_eq!(schedule(&shallow, 4).len(), 2);
        // Unclosed brackets by the thousand stay cheap and as written.
        let many = format!("{}a", "(".repeat(8_000));
        check(&many, 4, &[(4, &many)]);
        let spread = "( x [ y ".repeat(3_000);
        check(&spread, 4, &[(4, &spread)]);
        // Square weighting brackets are kept for the weight parser.
        check("[a] [b:2]", 4, &[(2, "[a] "), (4, "[a] b")]);
    }
}
