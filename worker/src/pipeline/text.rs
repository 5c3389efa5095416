//! Prompt → text embeddings: the CLIP tokenizers, window chunking and the text encoders.
//!
//! Prompts longer than the encoder's window are not cut: their tokens are split
//! into chunks of `window - 2`, each wrapped in bos/eos, padded to the window,
//! encoded separately and concatenated along the sequence axis (the scheme
//! AUTOMATIC1111's web UI made common; the UNet's cross-attention accepts any
//! sequence length). The negative prompt is padded with empty chunks to the
//! same count so both guidance branches share one batch. Nothing is cached yet.
//!
//! SD 1.x and 2.x have one encoder and condition on its last layer. SDXL has
//! two (`text_encoder`, `text_encoder_2`); each tokenizes the prompt with its
//! own pad token, both read the penultimate layer, and their states are
//! concatenated along the feature axis (768 + 1280 = 2048 for SDXL). The
//! second encoder's projected pooled output of the first chunk feeds the UNet's
//! added conditioning, as in ComfyUI and the A1111 web UI for long prompts.

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use tokenizers::Tokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior};

use super::clip::{ClipTextModel, Layer};
use super::config::TextSpec;
use super::error::PipelineError;
use super::layout::{ModelFiles, TextFiles, TokenizerSource};
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

/// One tokenizer and the text encoder it feeds.
struct Encoder {
    /// The CLIP BPE tokenizer.
    tokenizer: Tokenizer,
    /// The file the tokenizer came from, for error messages.
    tokenizer_path: PathBuf,
    /// The CLIP text transformer.
    model: ClipTextModel,
    /// Which hidden states condition the UNet.
    layer: Layer,
    /// Token ids of bos, eos and padding.
    ids: SpecialIds,
}

impl Encoder {
    /// Returns the text's token ids, without bos/eos.
    fn token_ids(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|e| PipelineError::Tokenizer {
                    path: self.tokenizer_path.clone(),
                    message: format!("cannot tokenize the prompt: {e}"),
                })?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// The tokenizers and text encoders of one model.
pub(crate) struct TextEncoders {
    /// `text_encoder` first, then SDXL's `text_encoder_2`.
    encoders: Vec<Encoder>,
    /// Tokens per encoder pass, bos and eos included (77 for CLIP); the same for all.
    window: usize,
    /// SDXL: an empty negative prompt conditions on zeros (`force_zeros_for_empty_prompt`).
    zero_empty_negative: bool,
    /// Where token ids are sent.
    device: Device,
}

/// The text conditioning of one render's guidance branches.
#[derive(Debug)]
pub(crate) struct TextEmbeddings {
    /// `[branches, chunks * window, context width]`: per-token states.
    pub(crate) context: Tensor,
    /// `[branches, projection_dim]`: SDXL's pooled text embedding.
    pub(crate) pooled: Option<Tensor>,
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

impl TextEncoders {
    /// Loads the tokenizers and text encoder weights of a model folder, one per `specs` entry.
    pub(crate) fn load(
        files: &ModelFiles,
        specs: &[TextSpec],
        zero_empty_negative: bool,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let mut encoders = Vec::with_capacity(specs.len());
        let mut window = None;
        for (text, spec) in files.text.iter().zip(specs) {
            let config_path = files.path(&text.config());
            let (tokenizer, tokenizer_path) = load_tokenizer(files, text)?;
            let id = |token: &str| {
                tokenizer
                    .token_to_id(token)
                    .ok_or_else(|| PipelineError::Tokenizer {
                        path: tokenizer_path.clone(),
                        message: format!("the vocabulary lacks {token}"),
                    })
            };
            let (bos, eos) = (id(STARTOFTEXT)?, id(ENDOFTEXT)?);
            let pad = match pad_token(files, text)? {
                Some(token) => id(&token)?,
                None => eos,
            };
            let c = &spec.config;
            let vocab = tokenizer.get_vocab_size(true);
            if vocab > c.vocab_size {
                return Err(PipelineError::config(
                    config_path,
                    format!(
                        "vocab_size = {} is smaller than the tokenizer's {vocab} tokens",
                        c.vocab_size
                    ),
                ));
            }
            match window {
                Some(w) if w != c.max_position_embeddings => {
                    return Err(PipelineError::config(
                        config_path,
                        format!(
                            "max_position_embeddings = {} differs from the first encoder's {w}",
                            c.max_position_embeddings
                        ),
                    ));
                }
                _ => window = Some(c.max_position_embeddings),
            }
            let model = weights::build(
                &files.path(&text.weights),
                candle_core::DType::F32,
                device,
                |vb| ClipTextModel::new(vb, c),
            )?;
            encoders.push(Encoder {
                tokenizer,
                tokenizer_path,
                model,
                layer: spec.layer,
                ids: SpecialIds { bos, eos, pad },
            });
        }
        let window = window.ok_or_else(|| {
            PipelineError::config(files.path(super::layout::MODEL_INDEX), "no text encoder")
        })?;
        Ok(Self {
            encoders,
            window,
            zero_empty_negative,
            device: device.clone(),
        })
    }

    /// Returns the prompt's token ids (first tokenizer), without bos/eos.
    #[cfg(test)]
    pub(crate) fn token_ids(&self, text: &str) -> Result<Vec<u32>, PipelineError> {
        match self.encoders.first() {
            Some(e) => e.token_ids(text),
            None => Ok(Vec::new()),
        }
    }

    /// Returns each encoder's bos, eos and pad ids.
    #[cfg(test)]
    pub(crate) fn special_ids(&self) -> Vec<SpecialIds> {
        self.encoders.iter().map(|e| e.ids).collect()
    }

    /// Encodes the prompt, or (negative, prompt) as two rows when `negative` is given.
    pub(crate) fn encode(
        &self,
        prompt: &str,
        negative: Option<&str>,
    ) -> Result<TextEmbeddings, PipelineError> {
        let branches: Vec<&str> = negative.into_iter().chain([prompt]).collect();
        let window = self.window;
        // Chunks per encoder and branch; every row gets the largest count.
        let mut chunked = Vec::with_capacity(self.encoders.len());
        for e in &self.encoders {
            let mut rows = Vec::with_capacity(branches.len());
            for text in &branches {
                rows.push(chunk(&e.token_ids(text)?, window, e.ids));
            }
            chunked.push(rows);
        }
        let chunks = chunked.iter().flatten().map(Vec::len).max().unwrap_or(1);
        tracing::debug!(chunks, guided = negative.is_some(), "encoding prompt");

        let batch = branches.len();
        let mut states = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (e, mut rows) in self.encoders.iter().zip(chunked) {
            for r in &mut rows {
                pad_chunks(r, chunks, window, e.ids);
            }
            let ids: Vec<u32> = rows.into_iter().flatten().flatten().collect();
            let ids = Tensor::from_vec(ids, (batch * chunks, window), &self.device)?;
            let out = e.model.forward(&ids, e.layer, e.ids.eos)?;
            let dim = out.states.dim(2)?;
            // Rows are (branch, chunk) in order, so this concatenates each branch's chunks.
            states.push(out.states.reshape((batch, chunks * window, dim))?);
            if let Some(p) = out.pooled {
                let width = p.dim(1)?;
                pooled = Some(
                    p.reshape((batch, chunks, width))?
                        .i((.., 0))?
                        .contiguous()?,
                );
            }
        }
        let mut context = Tensor::cat(&states, 2)?;
        if self.zero_empty_negative && negative.is_some_and(str::is_empty) {
            // diffusers' SDXL pipelines condition the unconditional branch on zeros when
            // no negative prompt is given (force_zeros_for_empty_prompt).
            context = zero_first_row(&context)?;
            pooled = pooled.map(|p| zero_first_row(&p)).transpose()?;
        }
        Ok(TextEmbeddings { context, pooled })
    }
}

/// Returns `t` with its first row (batch index 0) set to zeros.
fn zero_first_row(t: &Tensor) -> candle_core::Result<Tensor> {
    let rest = t.i(1..)?;
    Tensor::cat(&[&t.i(0..1)?.zeros_like()?, &rest], 0)
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
fn load_tokenizer(
    files: &ModelFiles,
    text: &TextFiles,
) -> Result<(Tokenizer, PathBuf), PipelineError> {
    let file = |name: &str| files.path(&text.component.tokenizer_file(name));
    match text.tokenizer {
        TokenizerSource::Json => {
            let path = file("tokenizer.json");
            let tokenizer = Tokenizer::from_file(&path).map_err(|e| PipelineError::Tokenizer {
                path: path.clone(),
                message: format!("cannot load: {e}"),
            })?;
            Ok((tokenizer, path))
        }
        TokenizerSource::VocabMerges => {
            let vocab = file("vocab.json");
            let merges = file("merges.txt");
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
/// SD 1.x and SDXL's first tokenizer pad with `<|endoftext|>`, SD 2.x and SDXL's
/// second with `!`; without the file, eos is used.
fn pad_token(files: &ModelFiles, text: &TextFiles) -> Result<Option<String>, PipelineError> {
    if !text.has_tokenizer_config {
        return Ok(None);
    }
    let path = files.path(&text.component.tokenizer_file("tokenizer_config.json"));
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
