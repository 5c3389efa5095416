//! Prompt → text embeddings: the CLIP tokenizers, prompt weighting, window chunking
//! and the text encoders.
//!
//! A prompt reaches the encoder prepared by [`kiln_domain::prompt::prepare`] (in
//! `conditioning`): extra-network tags removed, prompt editing and alternation
//! scheduled into stages, each stage's text parsed for AUTOMATIC1111's weighting
//! syntax (`(word:1.3)`, `(word)`, `[word]`, escapes, `BREAK`): the same code
//! the coordinator validates with and `kiln prompt` shows. Each weighted
//! piece is tokenized on its own and the tokens are laid out in chunks of
//! `window - 2` (75 for CLIP): a chunk closes when full or at a `BREAK`. Prompts
//! longer than the window are therefore not cut: each chunk is wrapped in
//! bos/eos, padded to the window, encoded separately and the results are
//! concatenated along the sequence axis (the scheme the A1111 web UI made
//! common; the UNet's cross-attention accepts any sequence length). The rows
//! encoded together (the negative prompt and the prompt, and every stage of an
//! edited one) are padded with empty chunks to the same count so they share one
//! batch.
//!
//! Weights are applied to the encoder's output the A1111 way (`text_cache::emphasize`):
//! each token's state times its weight, then the chunk rescaled to its original
//! mean. A prompt without weights is encoded exactly as before weighting existed.
//! Encoded chunks are cached per pipeline (`text_cache`), before weighting.
//!
//! SD 1.x and 2.x have one encoder and condition on its last layer. SDXL has
//! two (`text_encoder`, `text_encoder_2`); each tokenizes the prompt with its
//! own pad token, both read the penultimate layer, each is weighted on its own
//! (as the web UI weights each of SDXL's encoders), and their states are
//! concatenated along the feature axis (768 + 1280 = 2048 for SDXL). The
//! second encoder's projected pooled output of the first chunk, unweighted
//! (weights act on the per-token states only), feeds the UNet's added
//! conditioning, as in ComfyUI and the A1111 web UI for long prompts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Tensor};
use kiln_domain::prompt::{Chunk, Piece};
use tokenizers::Tokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Model, SplitDelimiterBehavior};

use super::assets::AssetFile;
use super::clip::{ClipTextModel, Layer};
use super::config::TextSpec;
use super::embeddings::{Embedding, Registry};
use super::error::PipelineError;
use super::layout::{ModelFiles, TextFiles, TokenizerSource};
use super::text_cache::{CAPACITY, ChunkCache, ChunkKey, ChunkStates, emphasize};
use super::text_extras::TextExtras;
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
    /// Encoded chunks, shared by every render of this model. A std mutex is enough:
    /// it is held only for lookups and inserts, never across an encoder pass.
    cache: Mutex<ChunkCache>,
    /// The textual-inversion embeddings loaded so far, with their token ids.
    embeddings: Registry,
}

/// The text conditioning of one render's guidance branches.
#[derive(Debug)]
pub(crate) struct TextEmbeddings {
    /// `[branches, chunks * window, context width]`: per-token states.
    pub(crate) context: Tensor,
    /// `[branches, projection_dim]`: SDXL's pooled text embedding.
    pub(crate) pooled: Option<Tensor>,
}

/// One row of text conditioning: a prepared text's weighted pieces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TextRow<'a> {
    /// The text's pieces, from [`kiln_domain::prompt::prepare`].
    pub(crate) pieces: &'a [Piece],
    /// An empty negative prompt: SDXL conditions it on zeros.
    pub(crate) empty_negative: bool,
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
    /// Loads the tokenizers and text encoder weights of a model folder, one per `specs`
    /// entry, with weights in `dtype`.
    pub(crate) fn load(
        files: &ModelFiles,
        specs: &[TextSpec],
        zero_empty_negative: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, PipelineError> {
        let mut encoders = Vec::with_capacity(specs.len());
        let widths = specs.iter().map(|s| s.config.hidden_size).collect();
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
            let model = weights::build(&files.path(&text.weights), dtype, device, |vb| {
                ClipTextModel::new(vb, c)
            })?;
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
            cache: Mutex::new(ChunkCache::new(CAPACITY)),
            embeddings: Registry::new(widths, dtype, device),
        })
    }

    /// Returns the embedding in `file`, loaded on first use with token ids of its own.
    ///
    /// # Errors
    ///
    /// As `embeddings::Registry::get`.
    pub(crate) fn embedding(&self, file: &AssetFile) -> Result<Arc<Embedding>, PipelineError> {
        self.embeddings.get(file)
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

    /// Encodes the prompt, or (negative, prompt) as two rows when `negative` is given,
    /// each prepared over one step (so without editing) by [`kiln_domain::prompt::prepare`],
    /// with the base encoders and no embeddings.
    ///
    /// # Errors
    ///
    /// `InvalidRecipe` on `prompt` or `negative_prompt` for a prompt kiln cannot read,
    /// `Tokenizer` when tokenizing fails, `Candle` when encoding fails.
    #[cfg(test)]
    pub(crate) fn encode(
        &self,
        prompt: &str,
        negative: Option<&str>,
    ) -> Result<TextEmbeddings, PipelineError> {
        let branches: Vec<(&'static str, &str)> = negative
            .map(|n| ("negative_prompt", n))
            .into_iter()
            .chain([("prompt", prompt)])
            .collect();
        let mut parsed = Vec::with_capacity(branches.len());
        for (field, text) in &branches {
            let stages = kiln_domain::prompt::prepare(text, 1).map_err(|e| {
                PipelineError::InvalidRecipe {
                    field,
                    message: e.to_string(),
                }
            })?;
            parsed.push(
                stages
                    .into_iter()
                    .next()
                    .map(|s| s.pieces)
                    .unwrap_or_default(),
            );
        }
        let rows: Vec<TextRow<'_>> = branches
            .iter()
            .zip(&parsed)
            .map(|((field, text), pieces)| TextRow {
                pieces,
                empty_negative: *field == "negative_prompt" && text.is_empty(),
            })
            .collect();
        self.encode_rows(&rows, &TextExtras::default())
    }

    /// Encodes rows of weighted pieces (guidance branches, and the stages of
    /// edited prompts) into one batch of conditioning, a row each.
    ///
    /// Each row's pieces are tokenized into chunks of `window - 2` tokens, and each
    /// chunk is framed, padded and encoded on its own (through the cache), weighted
    /// ([`emphasize`]) and concatenated; every row is padded with empty chunks to the
    /// largest count, as the web UI pads the texts it encodes together. The
    /// recipe's text-encoder LoRAs and embeddings (`extras`) apply.
    ///
    /// # Errors
    ///
    /// `Tokenizer` when tokenizing fails, `Candle` when encoding fails.
    pub(crate) fn encode_rows(
        &self,
        rows: &[TextRow<'_>],
        extras: &TextExtras,
    ) -> Result<TextEmbeddings, PipelineError> {
        let parsed: Vec<&[Piece]> = rows.iter().map(|r| r.pieces).collect();
        let body = self.window.saturating_sub(2).max(1);
        // Chunks per encoder and branch; every row gets the largest count.
        let mut chunked = Vec::with_capacity(self.encoders.len());
        for e in &self.encoders {
            let mut rows = Vec::with_capacity(parsed.len());
            for pieces in &parsed {
                rows.push(kiln_domain::prompt::chunk(pieces, body, |t| {
                    extras.tokenize(t, |t| e.token_ids(t))
                })?);
            }
            chunked.push(rows);
        }
        let chunks = chunked.iter().flatten().map(Vec::len).max().unwrap_or(1);
        tracing::debug!(chunks, rows = parsed.len(), "encoding prompt");

        let batch = parsed.len();
        let mut states = Vec::with_capacity(self.encoders.len());
        let mut pooled = None;
        for (index, (e, rows)) in self.encoders.iter().zip(chunked).enumerate() {
            // Framed windows and their weights, (branch, chunk) in order.
            let mut windows = Vec::with_capacity(batch * chunks);
            for row in &rows {
                for c in 0..chunks {
                    windows.push(match row.get(c) {
                        Some(chunk) => frame_weighted(chunk, self.window, e.ids),
                        None => (frame(&[], self.window, e.ids), vec![1.0; self.window]),
                    });
                }
            }
            let ids: Vec<&[u32]> = windows.iter().map(|(ids, _)| ids.as_slice()).collect();
            let encoded = self.encode_windows(index, e, &ids, extras)?;
            let mut weighted = Vec::with_capacity(encoded.len());
            for ((_, weights), chunk) in windows.iter().zip(&encoded) {
                weighted.push(emphasize(&chunk.states, weights)?);
            }
            // (branch, chunk) order: concatenating along the sequence and then
            // reshaping gives each branch its chunks in a row.
            let dim = weighted.first().map(|t| t.dim(2)).transpose()?.unwrap_or(0);
            states.push(Tensor::cat(&weighted, 1)?.reshape((batch, chunks * self.window, dim))?);
            let rows_pooled: Option<Vec<Tensor>> =
                encoded.iter().map(|c| c.pooled.clone()).collect();
            if let Some(rows_pooled) = rows_pooled {
                // One projection over every (branch, chunk) row, as one encoder pass
                // over all of them gives; the first chunk of each branch is kept.
                let model = extras.model(index, &e.model);
                if let Some(p) = model.project(&Tensor::cat(&rows_pooled, 0)?)? {
                    let width = p.dim(1)?;
                    pooled = Some(
                        p.reshape((batch, chunks, width))?
                            .i((.., 0))?
                            .contiguous()?,
                    );
                }
            }
        }
        let (hits, misses, entries) = self.cache().stats();
        tracing::trace!(hits, misses, entries, "text embedding cache");
        let mut context = Tensor::cat(&states, 2)?;
        let zero: Vec<bool> = rows
            .iter()
            .map(|r| self.zero_empty_negative && r.empty_negative)
            .collect();
        if zero.contains(&true) {
            // diffusers' SDXL pipelines condition the unconditional branch on zeros when
            // no negative prompt is given (force_zeros_for_empty_prompt).
            context = zero_rows(&context, &zero)?;
            pooled = pooled.map(|p| zero_rows(&p, &zero)).transpose()?;
        }
        Ok(TextEmbeddings { context, pooled })
    }

    /// Returns the encoder states of each window, from the cache or by encoding the
    /// missing ones in one pass.
    fn encode_windows(
        &self,
        index: usize,
        e: &Encoder,
        windows: &[&[u32]],
        extras: &TextExtras,
    ) -> Result<Vec<ChunkStates>, PipelineError> {
        let key = |ids: &[u32]| ChunkKey {
            encoder: index,
            variant: extras.variant.clone(),
            ids: ids.to_vec(),
        };
        let mut found: Vec<Option<ChunkStates>> = {
            let mut cache = self.cache();
            windows.iter().map(|ids| cache.get(&key(ids))).collect()
        };
        // Each distinct missing window once, in order of first appearance.
        let mut missing: Vec<&[u32]> = Vec::new();
        for (ids, hit) in windows.iter().zip(&found) {
            if hit.is_none() && !missing.contains(ids) {
                missing.push(ids);
            }
        }
        if !missing.is_empty() {
            let model = extras.model(index, &e.model);
            let (flat, inserts) =
                extras.inserts(index, &missing, model.vocab_size()?, e.ids.bos)?;
            let ids = Tensor::from_vec(flat, (missing.len(), self.window), &self.device)?;
            let out = model.forward_with(&ids, e.layer, e.ids.eos, &inserts)?;
            let mut cache = self.cache();
            for (r, ids) in missing.iter().enumerate() {
                let states = ChunkStates {
                    states: out.states.i(r..r + 1)?.contiguous()?,
                    pooled: out
                        .pooled
                        .as_ref()
                        .map(|p| p.i(r..r + 1).and_then(|p| p.contiguous()))
                        .transpose()?,
                };
                for (w, slot) in windows.iter().zip(found.iter_mut()) {
                    if slot.is_none() && w == ids {
                        *slot = Some(states.clone());
                    }
                }
                cache.insert(key(ids), states);
            }
        }
        found
            .into_iter()
            .map(|s| {
                s.ok_or_else(|| {
                    PipelineError::Candle(candle_core::Error::Msg(
                        "a prompt chunk was neither cached nor encoded".into(),
                    ))
                })
            })
            .collect()
    }

    /// Locks the cache; a panic elsewhere leaves it consistent, so poison is ignored.
    fn cache(&self) -> std::sync::MutexGuard<'_, ChunkCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the cache's (hits, misses, entries).
    #[cfg(test)]
    pub(crate) fn cache_stats(&self) -> (u64, u64, usize) {
        self.cache().stats()
    }
}

/// Returns `t` with the rows (batch indices) flagged in `zero` set to zeros.
fn zero_rows(t: &Tensor, zero: &[bool]) -> candle_core::Result<Tensor> {
    let rows = zero
        .iter()
        .enumerate()
        .map(|(r, &z)| {
            let row = t.i(r..r + 1)?;
            if z { row.zeros_like() } else { Ok(row) }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
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

/// Returns a weighted chunk framed and padded to `window`, with one weight per position
/// (1 for bos, eos and padding).
fn frame_weighted(chunk: &Chunk<u32>, window: usize, special: SpecialIds) -> (Vec<u32>, Vec<f32>) {
    let body: Vec<u32> = chunk.tokens.iter().map(|t| t.token).collect();
    let mut weights = Vec::with_capacity(window);
    weights.push(1.0);
    weights.extend(chunk.tokens.iter().map(|t| t.weight as f32));
    weights.resize(window, 1.0);
    (frame(&body, window, special), weights)
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
    fn chunks_are_framed_padded_and_weighted() {
        let chunk = Chunk {
            tokens: vec![
                kiln_domain::prompt::WeightedToken {
                    token: 1,
                    weight: 1.0,
                },
                kiln_domain::prompt::WeightedToken {
                    token: 2,
                    weight: 1.5,
                },
            ],
            ended_by_break: false,
        };
        let (ids, weights) = frame_weighted(&chunk, 6, IDS);
        assert_eq!(ids, [100, 1, 2, 101, 102, 102]);
        assert_eq!(weights, [1.0, 1.0, 1.5, 1.0, 1.0, 1.0]);
        assert_eq!(frame(&[], 4, IDS), [100, 101, 102, 102]);
    }
}
