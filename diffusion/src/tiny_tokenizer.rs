//! The tiny model's CLIP-style tokenizer files, in the formats real models ship.
//!
//! The vocabulary is laid out like CLIP's: the 256 byte-level characters in
//! GPT-2's `bytes_to_unicode` order, the same 256 with `</w>`, the tokens made
//! by a small deterministic merge list (whole prompt words, merged left to
//! right), then `<|startoftext|>` and `<|endoftext|>` last. `tokenizer.json`
//! is written by hand with serde_json so that it stays an independent
//! description of the pipeline that `text::clip_tokenizer` builds in code; a
//! test checks the two tokenize alike.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::text::{CLIP_SPLIT_PATTERN, END_OF_WORD, ENDOFTEXT, STARTOFTEXT, WHITESPACE_PATTERN};

/// Words whose merges the tiny vocabulary contains, in merge-rank order.
const WORDS: &[&str] = &[
    "the",
    "photo",
    "of",
    "and",
    "with",
    "in",
    "on",
    "an",
    "portrait",
    "painting",
    "landscape",
    "red",
    "blue",
    "green",
    "golden",
    "cat",
    "dog",
    "castle",
    "forest",
    "mountain",
    "river",
    "city",
    "night",
    "sky",
    "sea",
    "sunset",
    "light",
    "dark",
    "old",
    "man",
    "woman",
    "girl",
    "boy",
    "house",
    "tree",
    "flower",
    "style",
    "art",
    "detailed",
    "high",
    "quality",
    "oil",
    "canvas",
    "lighthouse",
    "storm",
    "misty",
    "morning",
];

/// The tiny vocabulary: tokens in id order and the merges in rank order.
pub(crate) struct TinyVocab {
    /// Token strings; a token's id is its index.
    pub(crate) tokens: Vec<String>,
    /// BPE merges, highest priority first.
    pub(crate) merges: Vec<(String, String)>,
}

impl TinyVocab {
    /// Builds the vocabulary; the same every time.
    pub(crate) fn new() -> Self {
        let bytes = byte_chars();
        let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
        tokens.extend(bytes.iter().map(|c| format!("{c}{END_OF_WORD}")));
        let mut known: HashSet<String> = tokens.iter().cloned().collect();
        let mut merges = Vec::new();
        for word in WORDS {
            let symbols: Vec<char> = word.chars().collect();
            let Some((first, rest)) = symbols.split_first() else {
                continue;
            };
            let mut left = first.to_string();
            for (i, c) in rest.iter().enumerate() {
                let right = if i + 1 == rest.len() {
                    format!("{c}{END_OF_WORD}")
                } else {
                    c.to_string()
                };
                let merged = format!("{left}{right}");
                if known.insert(merged.clone()) {
                    merges.push((left, right));
                    tokens.push(merged.clone());
                }
                left = merged;
            }
        }
        tokens.push(STARTOFTEXT.into());
        tokens.push(ENDOFTEXT.into());
        Self { tokens, merges }
    }

    /// Returns the id of `<|startoftext|>`.
    pub(crate) fn bos(&self) -> u32 {
        (self.tokens.len() - 2) as u32
    }

    /// Returns the id of `<|endoftext|>`.
    pub(crate) fn eos(&self) -> u32 {
        (self.tokens.len() - 1) as u32
    }

    /// Returns `vocab.json`: token → id.
    pub(crate) fn vocab_json(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), json!(id)))
            .collect();
        Value::Object(map)
    }

    /// Returns `merges.txt` as transformers writes it.
    pub(crate) fn merges_txt(&self) -> String {
        let mut text = String::from("#version: 0.2\n");
        for (a, b) in &self.merges {
            text.push_str(a);
            text.push(' ');
            text.push_str(b);
            text.push('\n');
        }
        text
    }

    /// Returns `tokenizer.json`: CLIP's pipeline in the HF tokenizers format.
    pub(crate) fn tokenizer_json(&self) -> Value {
        let special = |id: u32, content: &str| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": true, "special": true
            })
        };
        let merges: Vec<String> = self
            .merges
            .iter()
            .map(|(a, b)| format!("{a} {b}"))
            .collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(self.bos(), STARTOFTEXT), special(self.eos(), ENDOFTEXT)],
            "normalizer": {
                "type": "Sequence",
                "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": WHITESPACE_PATTERN}, "content": " "},
                    {"type": "Lowercase"}
                ]
            },
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split", "pattern": {"Regex": CLIP_SPLIT_PATTERN},
                        "behavior": "Removed", "invert": true
                    },
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
                ]
            },
            "post_processor": {
                "type": "RobertaProcessing",
                "sep": [ENDOFTEXT, self.eos()],
                "cls": [STARTOFTEXT, self.bos()],
                "trim_offsets": false,
                "add_prefix_space": false
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": ENDOFTEXT,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": END_OF_WORD,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": self.vocab_json(),
                "merges": merges
            }
        })
    }
}

/// An AddedToken entry as transformers writes it in tokenizer configs.
fn added_token(content: &str) -> Value {
    json!({
        "__type": "AddedToken", "content": content, "lstrip": false,
        "normalized": true, "rstrip": false, "single_word": false
    })
}

/// Returns `tokenizer_config.json` as stable-diffusion-v1-5 ships it (CLIPTokenizer), with
/// `pad` as its pad token (SD 2.x and SDXL's second tokenizer pad with `!`).
pub(crate) fn tokenizer_config_json(pad: &str) -> Value {
    json!({
        "add_prefix_space": false,
        "bos_token": added_token(STARTOFTEXT),
        "do_lower_case": true,
        "eos_token": added_token(ENDOFTEXT),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(ENDOFTEXT)
    })
}

/// Returns `special_tokens_map.json` as stable-diffusion-v1-5 ships it, with `pad` as its pad token.
pub(crate) fn special_tokens_map_json(pad: &str) -> Value {
    json!({
        "bos_token": added_token(STARTOFTEXT),
        "eos_token": added_token(ENDOFTEXT),
        "pad_token": pad,
        "unk_token": added_token(ENDOFTEXT)
    })
}

/// Returns GPT-2's byte-level alphabet (`bytes_to_unicode`) in CLIP's vocabulary order.
///
/// Printable Latin-1 bytes stand for themselves; the other 68 bytes map to
/// U+0100 upwards, in byte order, so no token contains whitespace or control characters.
pub(crate) fn byte_chars() -> Vec<char> {
    let mut bytes: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut next = 256;
    for b in 0..256 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(next);
            next += 1;
        }
    }
    chars.into_iter().filter_map(char::from_u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let chars = byte_chars();
        assert_eq!(chars.len(), 256);
        assert_eq!(chars.iter().collect::<HashSet<_>>().len(), 256);
        assert_eq!(chars[0], '!');
        // Byte 0x20 (space) is the 33rd byte outside the printable ranges: U+0120 'Ġ'.
        assert!(chars.contains(&'Ġ'));
        assert_eq!(*chars.last().unwrap_or(&' '), '\u{143}');
    }

    #[test]
    fn vocabulary_layout() {
        let v = TinyVocab::new();
        assert_eq!(v.tokens[0], "!");
        assert_eq!(v.tokens[256], "!</w>");
        assert_eq!(v.tokens[v.bos() as usize], STARTOFTEXT);
        assert_eq!(v.tokens[v.eos() as usize], ENDOFTEXT);
        assert!(v.tokens.contains(&"photo</w>".to_string()));
        assert_eq!(v.tokens.len(), 512 + v.merges.len() + 2);
        let unique: HashSet<_> = v.tokens.iter().collect();
        assert_eq!(unique.len(), v.tokens.len());
    }
}
