//! `kiln prompt TEXT [--steps N] [--model DIR] [--json]`: shows which text a
//! prompt stands for at each step (prompt editing and alternation), how each
//! text's weights parse and how its tokens fall into encoder chunks, with the
//! same code the coordinator validates with and the worker renders with
//! (`kiln_domain::prompt::prepare`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_diffusion::PromptTokenizer;
use kiln_proto::prompt::{self, Chunk, Piece, Stage};
use serde_json::json;

/// CLIP's window: 75 tokens plus bos and eos.
const CLIP_WINDOW: usize = 77;

/// Show how a prompt's weights parse and how its tokens fall into encoder chunks.
#[derive(clap::Args, Debug)]
pub struct Prompt {
    /// The prompt, in AUTOMATIC1111 syntax: (word:1.3), (word), [word], \(, BREAK,
    /// [from:to:when], [a|b].
    text: String,
    /// Schedule prompt editing and alternation over this many steps.
    #[arg(long, default_value_t = kiln_proto::spec::builtin::STEPS)]
    steps: u32,
    /// Count tokens with this model folder's tokenizer (default: an estimate by words).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Prompt {
    /// Runs `kiln prompt`.
    pub fn run(self) -> anyhow::Result<bool> {
        show(&self.text, self.steps, self.model.as_deref(), self.json).map(|()| true)
    }
}

/// The chunks of one text, and how they were counted.
struct Layout {
    chunks: Vec<Chunk<String>>,
    window: usize,
    /// The tokenizer file; `None` for the estimate by words.
    tokenizer: Option<String>,
}

/// Lays `pieces` out in chunks with the model's tokenizer, or estimates by words.
fn layout(pieces: &[Piece], tokenizer: Option<&PromptTokenizer>) -> anyhow::Result<Layout> {
    Ok(match tokenizer {
        Some(t) => Layout {
            chunks: prompt::chunk(pieces, t.window() - 2, |text| t.tokens(text))?,
            window: t.window(),
            tokenizer: Some(t.path().display().to_string()),
        },
        None => Layout {
            chunks: prompt::chunk(pieces, CLIP_WINDOW - 2, |text| {
                Ok::<_, std::convert::Infallible>(rough_tokens(text))
            })?,
            window: CLIP_WINDOW,
            tokenizer: None,
        },
    })
}

/// A run of steps (1-based, inclusive) that read one stage's text.
struct Run<'a> {
    first: u32,
    last: u32,
    stage: &'a Stage,
}

/// Groups the steps by the text they read, in order: step `n` reads the stage
/// the web UI picks at its counter `n - 1`.
fn runs(stages: &[Stage], steps: u32) -> Vec<Run<'_>> {
    let mut out: Vec<Run<'_>> = Vec::new();
    for step in 1..=steps.max(1) {
        let stage = &stages[prompt::stage_at(stages, step - 1)];
        match out.last_mut() {
            Some(run) if run.stage.text == stage.text => run.last = step,
            _ => out.push(Run {
                first: step,
                last: step,
                stage,
            }),
        }
    }
    out
}

/// Prints the schedule of `text` over `steps`, and each text's pieces and chunks.
///
/// A prompt without editing prints as it always did; one with editing prints
/// the runs of steps that read each text, and its JSON leaves out the prompt
/// as written (its `[a:b:N]` and `[a|b]` are not what the encoder reads).
///
/// # Errors
/// A malformed weight (quoting it), `AND`, or a model folder whose tokenizer
/// cannot be loaded.
fn show(text: &str, steps: u32, model: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let stages = prompt::prepare(text, steps)?;
    let tokenizer = match model {
        Some(dir) => Some(
            PromptTokenizer::load(dir)
                .with_context(|| format!("cannot load the tokenizer of {}", dir.display()))?,
        ),
        None => None,
    };
    let runs = runs(&stages, steps);
    let mut laid = Vec::with_capacity(runs.len());
    for run in &runs {
        laid.push(layout(&run.stage.pieces, tokenizer.as_ref())?);
    }
    let (window, tokenizer) = (
        laid.first().map_or(CLIP_WINDOW, |l| l.window),
        laid.first().and_then(|l| l.tokenizer.clone()),
    );
    if json {
        let chunks_json = |l: &Layout| -> Vec<serde_json::Value> {
            l.chunks
                .iter()
                .map(|c| {
                    json!({
                        "count": c.tokens.len(),
                        "ended_by_break": c.ended_by_break,
                        "tokens": c.tokens,
                    })
                })
                .collect()
        };
        let schedule: Vec<_> = runs
            .iter()
            .zip(&laid)
            .map(|(run, l)| {
                json!({
                    "first_step": run.first,
                    "last_step": run.last,
                    "text": run.stage.text,
                    "pieces": run.stage.pieces,
                    "chunks": chunks_json(l),
                })
            })
            .collect();
        let mut out = json!({
            "steps": steps,
            "window": window,
            "exact": tokenizer.is_some(),
            "tokenizer": tokenizer,
            "schedule": schedule,
        });
        if let ([run], [l]) = (runs.as_slice(), laid.as_slice()) {
            out["prompt"] = json!(text);
            out["pieces"] = json!(run.stage.pieces);
            out["chunks"] = json!(chunks_json(l));
        }
        println!("{out}");
    } else if let ([run], [l]) = (runs.as_slice(), laid.as_slice()) {
        print!(
            "{}",
            describe(
                &run.stage.pieces,
                &l.chunks,
                l.window,
                l.tokenizer.as_deref()
            )
        );
    } else {
        println!("schedule over {steps} steps:");
        for (run, l) in runs.iter().zip(&laid) {
            let steps = if run.first == run.last {
                format!("step {}", run.first)
            } else {
                format!("steps {}-{}", run.first, run.last)
            };
            println!("{steps}: {:?}", run.stage.text);
            for line in describe(
                &run.stage.pieces,
                &l.chunks,
                l.window,
                l.tokenizer.as_deref(),
            )
            .lines()
            {
                println!("  {line}");
            }
        }
    }
    Ok(())
}

/// Returns the text report: spans with weights, then chunks with tokens.
fn describe(
    pieces: &[Piece],
    chunks: &[Chunk<String>],
    window: usize,
    tokenizer: Option<&str>,
) -> String {
    let mut out = String::from("spans:\n");
    if pieces.is_empty() {
        out.push_str("  (empty prompt)\n");
    }
    for piece in pieces {
        match piece {
            Piece::Text { text, weight } => {
                out.push_str(&format!("  {:>7}  {text:?}\n", weight_text(*weight)))
            }
            Piece::Break => out.push_str("     ----  BREAK\n"),
        }
    }
    let body = window - 2;
    match tokenizer {
        Some(path) => out.push_str(&format!(
            "chunks ({body} tokens + bos/eos per {window}-token window; tokenizer {path}):\n"
        )),
        None => out.push_str(&format!(
            "chunks, estimated ({body} tokens + bos/eos per {window}-token window): counted by \
             words and punctuation, a lower bound; pass --model DIR for the model's tokenizer:\n"
        )),
    }
    for (i, c) in chunks.iter().enumerate() {
        let unit = if tokenizer.is_some() {
            "tokens"
        } else {
            "words"
        };
        let end = if c.ended_by_break {
            ", ended by BREAK"
        } else {
            ""
        };
        out.push_str(&format!(
            "  chunk {}: {} of {body} {unit}{end}\n",
            i + 1,
            c.tokens.len()
        ));
        if !c.tokens.is_empty() {
            let line: Vec<String> = c
                .tokens
                .iter()
                .map(|t| {
                    if t.weight == 1.0 {
                        t.token.clone()
                    } else {
                        format!("{}×{}", t.token, weight_text(t.weight))
                    }
                })
                .collect();
            out.push_str(&format!("    {}\n", line.join(" ")));
        }
    }
    out
}

/// Formats a weight with at most 4 decimals and no trailing zeros (`1.1`, `0.9091`).
fn weight_text(weight: f64) -> String {
    let text = format!("{weight:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.to_string()
    }
}

/// Splits text the way CLIP's pre-tokenizer does before BPE: runs of
/// letters, single digits, runs of other symbols. Each piece is at least one
/// token, so this is a lower bound on the token count.
fn rough_tokens(text: &str) -> Vec<String> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Letter,
        Digit,
        Space,
        Symbol,
    }
    let class = |c: char| {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Digit
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Symbol
        }
    };
    let mut out: Vec<String> = Vec::new();
    let mut previous = Class::Space;
    for c in text.chars() {
        let now = class(c);
        match now {
            Class::Space => {}
            Class::Letter | Class::Symbol if now == previous => {
                if let Some(last) = out.last_mut() {
                    last.push(c);
                }
            }
            _ => out.push(c.to_string()),
        }
        previous = now;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rough_tokens_follow_clips_pre_tokenizer() {
        assert_eq!(
            rough_tokens("a red-car, 16k  photo!!"),
            ["a", "red", "-", "car", ",", "1", "6", "k", "photo", "!!"]
        );
        assert!(rough_tokens("   ").is_empty());
    }

    #[test]
    fn weights_print_short() {
        assert_eq!(weight_text(1.0), "1");
        assert_eq!(weight_text(1.1), "1.1");
        assert_eq!(weight_text(1.0 / 1.1), "0.9091");
        assert_eq!(weight_text(1.573), "1.573");
        assert_eq!(weight_text(-1.0), "-1");
    }

    #[test]
    fn the_report_shows_spans_breaks_and_chunks() {
        let pieces = prompt::parse("a (red car:1.3) BREAK [sky]").unwrap();
        let chunks = prompt::chunk(&pieces, 75, |t| {
            Ok::<_, std::convert::Infallible>(rough_tokens(t))
        })
        .unwrap();
        let report = describe(&pieces, &chunks, 77, None);
        assert!(report.contains("      1.3  \"red car\""), "{report}");
        assert!(report.contains("----  BREAK"), "{report}");
        assert!(
            report.contains("chunk 1: 3 of 75 words, ended by BREAK"),
            "{report}"
        );
        assert!(report.contains("a red×1.3 car×1.3"), "{report}");
        assert!(report.contains("chunk 2: 1 of 75 words"), "{report}");
        assert!(report.contains("sky×0.9091"), "{report}");
        assert!(report.contains("estimated"), "{report}");
    }

    #[test]
    fn the_tiny_models_tokenizer_gives_exact_chunks() {
        let dir = tempfile::tempdir().unwrap();
        kiln_diffusion::write_tiny_model(dir.path()).unwrap();
        let long = vec!["red"; 100].join(" ");
        show(&long, 20, Some(dir.path()), true).unwrap();
        let tokenizer = PromptTokenizer::load(dir.path()).unwrap();
        let pieces = prompt::parse(&long).unwrap();
        let chunks =
            prompt::chunk(&pieces, tokenizer.window() - 2, |t| tokenizer.tokens(t)).unwrap();
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        assert!(total >= 100, "{total}");
        assert!(chunks.len() >= 2);
        assert!(chunks.iter().all(|c| c.tokens.len() <= 75));
    }

    #[test]
    fn steps_are_grouped_by_the_text_they_read() {
        let stages = prompt::prepare("a [dog:cat:0.5] in a [red|blue] car", 10).unwrap();
        let got: Vec<(u32, u32, &str)> = runs(&stages, 10)
            .iter()
            .map(|r| (r.first, r.last, r.stage.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 2, "a dog in a red car"),
                (3, 3, "a dog in a blue car"),
                (4, 4, "a dog in a red car"),
                (5, 5, "a dog in a blue car"),
                (6, 6, "a dog in a red car"),
                (7, 7, "a cat in a blue car"),
                (8, 8, "a cat in a red car"),
                (9, 9, "a cat in a blue car"),
                (10, 10, "a cat in a red car"),
            ]
        );
        let plain = prompt::prepare("(style:anime)", 20).unwrap();
        let one = runs(&plain, 20);
        assert_eq!((one.len(), one[0].first, one[0].last), (1, 1, 20));
        assert_eq!(one[0].stage.pieces, [Piece::text("style:anime", 1.1)]);
    }

    #[test]
    fn and_is_an_error_saying_it_is_not_supported() {
        let e = show("a cat AND a dog", 20, None, true).unwrap_err();
        assert!(format!("{e:#}").contains("not support"), "{e:#}");
    }

    #[test]
    fn a_malformed_weight_is_an_error_quoting_it() {
        let e = show("a (red car:1.2.3) here", 20, None, false).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("(red car:1.2.3)"), "{text}");
    }
}
