//! What a recipe's LoRAs and embeddings change in text encoding.
//!
//! [`TextExtras`] carries, for one render, the text encoders merged with the
//! recipe's text-encoder LoRAs (or none: the base encoders) with the key that
//! keeps their chunks apart in the cache, and the embeddings its prompts may
//! name. Tokenizing through it turns every word equal to an embedding's name
//! into the embedding's token ids (`embeddings`); a word is a run of letters,
//! digits, `_` and `-`, matched exactly. Those ids then take the weight of the
//! prompt piece they stand in, as A1111 weights an embedding's vectors, and the
//! encoder reads the embedding's vectors at their positions ([`TextExtras::inserts`]).

use std::sync::Arc;

use candle_core::Tensor;

use super::clip::{ClipTextModel, Insert};
use super::embeddings::Embedding;
use super::error::PipelineError;

/// A recipe's changes to text encoding; the default changes nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct TextExtras {
    /// Cache key of the text-encoder LoRA set; empty for the base encoders.
    pub(crate) variant: String,
    /// Per text encoder, the merged model, or `None` for the base one.
    pub(crate) models: Vec<Option<Arc<ClipTextModel>>>,
    /// The embeddings the prompts may use, by name.
    pub(crate) embeddings: Vec<(String, Arc<Embedding>)>,
}

/// Returns whether `c` belongs to a word that may name an embedding.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

impl TextExtras {
    /// Returns the model of text encoder `index`: the merged one, else `base`.
    pub(crate) fn model<'a>(&'a self, index: usize, base: &'a ClipTextModel) -> &'a ClipTextModel {
        match self.models.get(index) {
            Some(Some(m)) => m,
            _ => base,
        }
    }

    /// Tokenizes `text` with `tokenize`, each word that names an embedding becoming
    /// the embedding's ids (the text around it is tokenized piece by piece: CLIP's
    /// tokenizer splits at word boundaries anyway).
    pub(crate) fn tokenize(
        &self,
        text: &str,
        tokenize: impl Fn(&str) -> Result<Vec<u32>, PipelineError>,
    ) -> Result<Vec<u32>, PipelineError> {
        if self.embeddings.is_empty() {
            return tokenize(text);
        }
        let mut ids = Vec::new();
        let mut plain_from = 0;
        let mut chars = text.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            if !is_word_char(c) {
                continue;
            }
            let mut end = start + c.len_utf8();
            while let Some(&(i, c)) = chars.peek() {
                if !is_word_char(c) {
                    break;
                }
                end = i + c.len_utf8();
                chars.next();
            }
            let word = &text[start..end];
            if let Some((_, e)) = self.embeddings.iter().find(|(name, _)| name == word) {
                ids.extend(tokenize(&text[plain_from..start])?);
                ids.extend((0..e.len() as u32).map(|k| e.first_id + k));
                plain_from = end;
            }
        }
        ids.extend(tokenize(&text[plain_from..])?);
        Ok(ids)
    }

    /// For windows of ids (one row each) read by text encoder `encoder`: the ids to
    /// look up in the token table (each embedding id replaced by `stand_in`) and the
    /// embedding vectors to put at those positions.
    ///
    /// # Errors
    ///
    /// `Candle` when an id past the vocabulary belongs to no embedding of the recipe.
    pub(crate) fn inserts(
        &self,
        encoder: usize,
        windows: &[&[u32]],
        vocab: usize,
        stand_in: u32,
    ) -> Result<(Vec<u32>, Vec<Insert>), PipelineError> {
        let mut flat = Vec::with_capacity(windows.iter().map(|w| w.len()).sum());
        let mut inserts = Vec::new();
        for (row, ids) in windows.iter().enumerate() {
            for (pos, &id) in ids.iter().enumerate() {
                if (id as usize) < vocab {
                    flat.push(id);
                    continue;
                }
                let vector: Option<Tensor> = self
                    .embeddings
                    .iter()
                    .find_map(|(_, e)| e.vector(encoder, id));
                let vector = vector.ok_or_else(|| {
                    PipelineError::Candle(candle_core::Error::Msg(format!(
                        "token id {id} is past the vocabulary and no embedding's"
                    )))
                })?;
                flat.push(stand_in);
                inserts.push(Insert { row, pos, vector });
            }
        }
        Ok((flat, inserts))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn extras() -> TextExtras {
        let vectors = vec![Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap()];
        TextExtras {
            embeddings: vec![(
                "bad-hands".into(),
                Arc::new(Embedding {
                    first_id: 1000,
                    vectors,
                }),
            )],
            ..Default::default()
        }
    }

    /// A tokenizer of its own: one id per character that is not a space.
    fn chars(text: &str) -> Result<Vec<u32>, PipelineError> {
        Ok(text
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(u32::from)
            .collect())
    }

    #[test]
    fn words_naming_an_embedding_become_its_ids() -> Result<(), PipelineError> {
        let e = extras();
        assert_eq!(
            e.tokenize("a bad-hands,b", chars)?,
            [97, 1000, 1001, 44, 98]
        );
        assert_eq!(e.tokenize("bad-hands", chars)?, [1000, 1001]);
        // Part of a longer word, or another case: plain text.
        assert_eq!(e.tokenize("xbad-hands", chars)?, chars("xbad-hands")?);
        assert_eq!(e.tokenize("Bad-hands", chars)?, chars("Bad-hands")?);
        assert_eq!(
            TextExtras::default().tokenize("bad-hands", chars)?,
            chars("bad-hands")?
        );
        let windows: [&[u32]; 2] = [&[1, 1001, 2], &[1000, 3, 3]];
        let (ids, inserts) = e.inserts(0, &windows, 100, 7)?;
        assert_eq!(ids, [1, 7, 2, 7, 3, 3]);
        let at: Vec<(usize, usize)> = inserts.iter().map(|i| (i.row, i.pos)).collect();
        assert_eq!(at, [(0, 1), (1, 0)]);
        assert!(e.inserts(0, &[&[5000]], 100, 7).is_err());
        Ok(())
    }
}
