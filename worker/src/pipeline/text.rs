//! Prompt → text embeddings: the CLIP tokenizer, window chunking and the text encoder.
//!
//! Prompts longer than the encoder's window are not cut: their tokens are split
//! into chunks of `window - 2`, each wrapped in bos/eos, padded to the window,
//! encoded separately and concatenated along the sequence axis (the scheme
//! AUTOMATIC1111's web UI made common; the UNet's cross-attention accepts any
//! sequence length). The negative prompt is padded with empty chunks to the
//! same count so both guidance branches share one batch. Nothing is cached yet.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_transformers::models::clip::text_model::{ClipTextConfig, ClipTextTransformer};
use tokenizers::Tokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior};

use super::error::PipelineError;
use super::layout::{self, ModelFiles, TokenizerSource};
use super::weights;

/// CLIP's beginning-of-text token.
pub(crate) const STARTOFTEXT: &str = "<|startoftext|>";
/// CLIP's end-of-text token; also its unknown token and SD 1.x's padding.
pub(crate) const ENDOFTEXT: &str = "<|endoftext|>";
/// CLIP's word-splitting pattern, as transformers' `CLIPConverter` writes it.
pub(crate) const CLIP_SPLIT_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// CLIP's whitespace collapse (`\s+` → one space).
pub(crate) const WHITESPACE_PATTERN: &str = r"\s+";
/// CLIP's end-of-word marker appended to the last symbol of each word.
pub(crate) const END_OF_WORD: &str = "</w>";

/// The tokenizer and text encoder of one model.
pub(crate) struct TextEncoder {
    /// The CLIP BPE tokenizer.
    tokenizer: Tokenizer,
    /// The file the tokenizer came from, for error messages.
    tokenizer_path: PathBuf,
    /// The CLIP text transformer (per-token states, no pooling).
    model: ClipTextTransformer,
    /// Tokens per encoder pass, bos and eos included (77 for CLIP).
    window: usize,
    /// Token ids of bos, eos and padding.
    ids: SpecialIds,
    /// Where token ids are sent.
    device: Device,
}

/// The token ids that frame and pad a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SpecialIds {
    /// Opens every chunk.
    pub(crate) bos: u32,
    /// Closes every chunk.
    pub(crate) eos: u32,
    /// Fills a chunk to the window.
    pub(crate) pad: u32,
}

impl TextEncoder {
    /// Loads the tokenizer and the text encoder weights of a model folder.
    pub(crate) fn load(
        files: &ModelFiles,
        config: &ClipTextConfig,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let (tokenizer, tokenizer_path) = load_tokenizer(files)?;
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| PipelineError::Tokenizer {
                    path: tokenizer_path.clone(),
                    message: format!("the vocabulary lacks {token}"),
                })
        };
        let (bos, eos) = (id(STARTOFTEXT)?, id(ENDOFTEXT)?);
        let pad = match pad_token(files)? {
            Some(token) => id(&token)?,
            None => eos,
        };
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(PipelineError::config(
                files.path(layout::TEXT_ENCODER_CONFIG),
                format!(
                    "vocab_size = {} is smaller than the tokenizer's {vocab} tokens",
                    config.vocab_size
                ),
            ));
        }
        let model = weights::build(
            &files.path(&files.text_encoder_weights),
            candle_core::DType::F32,
            device,
            |vb| ClipTextTransformer::new(vb.pp("text_model"), config),
        )?;
        Ok(Self {
            tokenizer,
            tokenizer_path,
            model,
            window: config.max_position_embeddings,
            ids: SpecialIds { bos, eos, pad },
            device: device.clone(),
        })
    }

    /// Returns the prompt's token ids, without bos/eos.
    pub(crate) fn token_ids(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|e| PipelineError::Tokenizer {
                    path: self.tokenizer_path.clone(),
                    message: format!("cannot tokenize the prompt: {e}"),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Returns the per-token text states: `[1, chunks * window, dim]` for the prompt, or
    /// `[2, chunks * window, dim]` as (negative, prompt) when `negative` is given.
    pub(crate) fn encode(
        &self,
        prompt: &str,
        negative: Option<&str>,
    ) -> Result<Tensor, PipelineError> {
        let mut cond = chunk(&self.token_ids(prompt)?, self.window, self.ids);
        let mut uncond = match negative {
            Some(text) => Some(chunk(&self.token_ids(text)?, self.window, self.ids)),
            None => None,
        };
        let chunks = cond.len().max(uncond.as_ref().map_or(0, Vec::len));
        pad_chunks(&mut cond, chunks, self.window, self.ids);
        if let Some(u) = uncond.as_mut() {
            pad_chunks(u, chunks, self.window, self.ids);
        }
        tracing::debug!(chunks, guided = negative.is_some(), "encoding prompt");
        let rows: Vec<u32> = uncond.into_iter().flatten().chain(cond).flatten().collect();
        let batch = rows.len() / (chunks * self.window);
        let ids = Tensor::from_vec(rows, (batch * chunks, self.window), &self.device)?;
        // usize::MAX: no padding mask, only the causal one, as SD 1.x was trained.
        let states = self.model.forward_with_mask(&ids, usize::MAX)?;
        let dim = states.dim(2)?;
        // Rows are (branch, chunk) in order, so this concatenates each branch's chunks.
        Ok(states.reshape((batch, chunks * self.window, dim))?)
    }
}

/// Splits token ids into framed, padded chunks of `window` tokens; at least one chunk.
pub(crate) fn chunk(ids: &[u32], window: usize, special: SpecialIds) -> Vec<Vec<u32>> {
    let body = window.saturating_sub(2).max(1);
    let mut chunks: Vec<Vec<u32>> = ids
        .chunks(body)
        .map(|c| frame(c, window, special))
        .collect();
    if chunks.is_empty() {
        chunks.push(frame(&[], window, special));
    }
    chunks
}

/// Appends empty chunks until there are `n`.
pub(crate) fn pad_chunks(chunks: &mut Vec<Vec<u32>>, n: usize, window: usize, special: SpecialIds) {
    while chunks.len() < n {
        chunks.push(frame(&[], window, special));
    }
}

/// Returns `[bos] + body + [eos]` padded to `window`.
fn frame(body: &[u32], window: usize, special: SpecialIds) -> Vec<u32> {
    let mut row = Vec::with_capacity(window);
    row.push(special.bos);
    row.extend_from_slice(body);
    row.push(special.eos);
    row.resize(window, special.pad);
    row
}

/// Loads `tokenizer.json`, or assembles CLIP's tokenizer from `vocab.json` + `merges.txt`.
fn load_tokenizer(files: &ModelFiles) -> Result<(Tokenizer, PathBuf), PipelineError> {
    match files.tokenizer {
        TokenizerSource::Json => {
            let path = files.path(layout::TOKENIZER_JSON);
            let tokenizer = Tokenizer::from_file(&path).map_err(|e| PipelineError::Tokenizer {
                path: path.clone(),
                message: format!("cannot load: {e}"),
            })?;
            Ok((tokenizer, path))
        }
        TokenizerSource::VocabMerges => {
            let vocab = files.path(layout::TOKENIZER_VOCAB);
            let merges = files.path(layout::TOKENIZER_MERGES);
            let tokenizer =
                clip_tokenizer(&vocab, &merges).map_err(|e| PipelineError::Tokenizer {
                    path: vocab.clone(),
                    message: format!(
                        "cannot build a CLIP tokenizer with {}: {e}",
                        merges.display()
                    ),
                })?;
            Ok((tokenizer, vocab))
        }
    }
}

/// Assembles CLIP's tokenizer pipeline (transformers' `CLIPConverter`) around a BPE model.
pub(crate) fn clip_tokenizer(vocab: &Path, merges: &Path) -> tokenizers::Result<Tokenizer> {
    let utf8 = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{} is not valid UTF-8", p.display()))
    };
    let bpe = BPE::from_file(&utf8(vocab)?, &utf8(merges)?)
        .unk_token(ENDOFTEXT.into())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.into())
        .fuse_unk(false)
        .build()?;
    let bos = bpe
        .token_to_id(STARTOFTEXT)
        .ok_or("vocab.json lacks <|startoftext|>")?;
    let eos = bpe
        .token_to_id(ENDOFTEXT)
        .ok_or("vocab.json lacks <|endoftext|>")?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(WHITESPACE_PATTERN.into()),
            " ",
        )?
        .into(),
        Lowercase.into(),
    ])))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        Split::new(
            SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )?
        .into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new((ENDOFTEXT.into(), eos), (STARTOFTEXT.into(), bos))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.add_special_tokens([
        AddedToken::from(STARTOFTEXT, true).normalized(true),
        AddedToken::from(ENDOFTEXT, true).normalized(true),
    ])?;
    Ok(tokenizer)
}

/// Returns the pad token named by `tokenizer_config.json`, if the file names one.
///
/// SD 1.x pads with `<|endoftext|>`, SD 2.x with `!`; without the file, eos is used.
fn pad_token(files: &ModelFiles) -> Result<Option<String>, PipelineError> {
    if !files.has_tokenizer_config {
        return Ok(None);
    }
    let path = files.path(layout::TOKENIZER_CONFIG);
    let config: serde_json::Value = super::config::read_json(&path)?;
    Ok(match config.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: SpecialIds = SpecialIds {
        bos: 100,
        eos: 101,
        pad: 102,
    };

    #[test]
    fn short_prompt_is_one_framed_chunk() {
        assert_eq!(
            chunk(&[1, 2, 3], 8, IDS),
            [vec![100, 1, 2, 3, 101, 102, 102, 102]]
        );
        assert_eq!(chunk(&[], 4, IDS), [vec![100, 101, 102, 102]]);
    }

    #[test]
    fn long_prompt_is_split_not_cut() {
        let ids: Vec<u32> = (0..13).collect();
        let chunks = chunk(&ids, 6, IDS);
        assert_eq!(
            chunks,
            [
                vec![100, 0, 1, 2, 3, 101],
                vec![100, 4, 5, 6, 7, 101],
                vec![100, 8, 9, 10, 11, 101],
                vec![100, 12, 101, 102, 102, 102],
            ]
        );
        let body: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c[1..5].to_vec())
            .filter(|&t| t < 100)
            .collect();
        assert_eq!(body, ids);
    }

    #[test]
    fn padding_adds_empty_chunks() {
        let mut chunks = chunk(&[7], 4, IDS);
        pad_chunks(&mut chunks, 3, 4, IDS);
        assert_eq!(
            chunks,
            [
                vec![100, 7, 101, 102],
                vec![100, 101, 102, 102],
                vec![100, 101, 102, 102]
            ]
        );
    }
}
