//! `kiln prompt TEXT [--model DIR] [--json]`: shows how a prompt's weights
//! parse and how its tokens fall into encoder chunks, with the same parser
//! the coordinator validates with and the worker renders with.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_diffusion::PromptTokenizer;
use kiln_proto::prompt::{self, Chunk, Piece};
use serde_json::json;

/// CLIP's window: 75 tokens plus bos and eos.
const CLIP_WINDOW: usize = 77;

/// Show how a prompt's weights parse and how its tokens fall into encoder chunks.
#[derive(clap::Args, Debug)]
pub struct Prompt {
    /// The prompt, in AUTOMATIC1111 syntax: (word:1.3), (word), [word], \(, BREAK.
    text: String,
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
        show(&self.text, self.model.as_deref(), self.json).map(|()| true)
    }
}

/// Prints the pieces and chunks of `text`.
///
/// # Errors
/// A malformed weight (quoting it), or a model folder whose tokenizer cannot
/// be loaded.
fn show(text: &str, model: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let pieces = prompt::parse(text)?;
    let (chunks, window, tokenizer) = match model {
        Some(dir) => {
            let tokenizer = PromptTokenizer::load(dir)
                .with_context(|| format!("cannot load the tokenizer of {}", dir.display()))?;
            let chunks = prompt::chunk(&pieces, tokenizer.window() - 2, |t| tokenizer.tokens(t))?;
            let path = tokenizer.path().display().to_string();
            (chunks, tokenizer.window(), Some(path))
        }
        None => {
            let chunks = prompt::chunk(&pieces, CLIP_WINDOW - 2, |t| {
                Ok::<_, std::convert::Infallible>(rough_tokens(t))
            })?;
            (chunks, CLIP_WINDOW, None)
        }
    };
    if json {
        let chunks: Vec<_> = chunks
            .iter()
            .map(|c| {
                json!({
                    "count": c.tokens.len(),
                    "ended_by_break": c.ended_by_break,
                    "tokens": c.tokens,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "prompt": text,
                "pieces": pieces,
                "window": window,
                "exact": tokenizer.is_some(),
                "tokenizer": tokenizer,
                "chunks": chunks,
            })
        );
    } else {
        print!(
            "{}",
            describe(&pieces, &chunks, window, tokenizer.as_deref())
        );
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
        show(&long, Some(dir.path()), true).unwrap();
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
    fn a_malformed_weight_is_an_error_quoting_it() {
        let e = show("a (red car:1.2.3) here", None, false).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("(red car:1.2.3)"), "{text}");
    }
}
