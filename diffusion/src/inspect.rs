//! Looking into a model folder without loading its weights: the tokenizer on
//! its own (for `kiln prompt --model`) and the memory the loaded model will
//! hold (for the worker's residency budget).

use std::io::Read;
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use super::error::PipelineError;
use super::layout::{self, ModelFiles};

/// Bytes per weight element once loaded: the pipeline keeps weights as f32.
const LOADED_ELEMENT_BYTES: u64 = 4;
/// Largest safetensors header read (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// CLIP's window when a folder's text encoder config does not say.
const DEFAULT_WINDOW: usize = 77;

/// A model's tokenizer, loaded without the text encoder.
pub struct PromptTokenizer {
    /// The tokenizer pipeline.
    tokenizer: Tokenizer,
    /// The file it came from.
    path: PathBuf,
    /// Tokens per encoder pass, bos and eos included.
    window: usize,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("path", &self.path)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// Loads the tokenizer of a diffusers-layout folder (`tokenizer/tokenizer.json`,
    /// or `vocab.json` + `merges.txt`) and the window of its text encoder
    /// (`max_position_embeddings`, 77 when the config is absent).
    ///
    /// # Errors
    /// `Tokenizer` when neither tokenizer form is present or loadable,
    /// `Config` when the text encoder config is malformed.
    pub fn load(dir: &Path) -> Result<Self, PipelineError> {
        let (tokenizer, path) = if dir
            .join(layout::TEXT_1.tokenizer_file("tokenizer.json"))
            .is_file()
        {
            let path = dir.join(layout::TEXT_1.tokenizer_file("tokenizer.json"));
            let tokenizer = Tokenizer::from_file(&path).map_err(|e| PipelineError::Tokenizer {
                path: path.clone(),
                message: format!("cannot load: {e}"),
            })?;
            (tokenizer, path)
        } else {
            let vocab = dir.join(layout::TEXT_1.tokenizer_file("vocab.json"));
            let merges = dir.join(layout::TEXT_1.tokenizer_file("merges.txt"));
            if !vocab.is_file() || !merges.is_file() {
                return Err(PipelineError::Tokenizer {
                    path: dir.join("tokenizer"),
                    message: "found neither tokenizer.json nor vocab.json + merges.txt".into(),
                });
            }
            let tokenizer = super::text::clip_tokenizer(&vocab, &merges).map_err(|e| {
                PipelineError::Tokenizer {
                    path: vocab.clone(),
                    message: format!(
                        "cannot build a CLIP tokenizer with {}: {e}",
                        merges.display()
                    ),
                }
            })?;
            (tokenizer, vocab)
        };
        let config = dir.join(layout::TEXT_1.config());
        let window = if config.is_file() {
            let value: serde_json::Value = super::config::read_json(&config)?;
            match value.get("max_position_embeddings") {
                None => DEFAULT_WINDOW,
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n >= 3)
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        PipelineError::config(
                            &config,
                            format!(
                                "max_position_embeddings must be an integer of at least 3, got {v}"
                            ),
                        )
                    })?,
            }
        } else {
            DEFAULT_WINDOW
        };
        Ok(Self {
            tokenizer,
            path,
            window,
        })
    }

    /// Returns the file the tokenizer came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns the tokens per encoder pass, bos and eos included (77 for CLIP).
    pub fn window(&self) -> usize {
        self.window
    }

    /// Returns the tokens of `text` as the vocabulary spells them (`red</w>`),
    /// without bos/eos.
    ///
    /// # Errors
    /// `Tokenizer` when the tokenizer fails on the text.
    pub fn tokens(&self, text: &str) -> Result<Vec<String>, PipelineError> {
        let encoding =
            self.tokenizer
                .encode(text, false)
                .map_err(|e| PipelineError::Tokenizer {
                    path: self.path.clone(),
                    message: format!("cannot tokenize {text:?}: {e}"),
                })?;
        Ok(encoding.get_tokens().to_vec())
    }
}

/// Returns an estimate of the memory a loaded model holds: the element count
/// of every tensor in its weights files (read from the safetensors headers,
/// nothing else is read) times 4 bytes, since the pipeline keeps weights as
/// f32, so an fp16 file counts twice its size.
///
/// It is an honest lower bound for the weights and nothing more: the
/// activations of a render (attention scores, VAE feature maps) come on top,
/// and they grow with the image size, so a memory budget needs headroom.
///
/// # Errors
/// The errors of locating the folder's files, `Io` when a weights file cannot
/// be read, `Weights` when its header is malformed.
pub fn resident_bytes(dir: &Path) -> Result<u64, PipelineError> {
    let files = ModelFiles::locate(dir)?;
    let mut total = 0u64;
    for rel in files.read_set() {
        if rel.ends_with(".safetensors") {
            total = total.saturating_add(file_bytes(&files.path(&rel))?);
        }
    }
    Ok(total)
}

/// Returns the memory `elements` weights hold once loaded, by the one measure
/// of [`resident_bytes`]: 4 bytes each. Merged LoRA variants and ControlNets
/// are sized with it too, so that one budget adds like with like.
pub(crate) fn loaded_bytes(elements: u64) -> u64 {
    elements.saturating_mul(LOADED_ELEMENT_BYTES)
}

/// Returns [`loaded_bytes`] of every tensor in one safetensors file, from its header.
///
/// # Errors
/// `Io` when the file cannot be read, `Weights` when its header is malformed.
pub(crate) fn file_bytes(path: &Path) -> Result<u64, PipelineError> {
    Ok(loaded_bytes(tensor_elements(path)?))
}

/// Returns the number of elements of all tensors in a safetensors file, from its header.
fn tensor_elements(path: &Path) -> Result<u64, PipelineError> {
    let malformed = |message: String| PipelineError::Weights {
        file: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| PipelineError::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(malformed(format!(
            "the safetensors header claims {len} bytes, more than the format allows"
        )));
    }
    let mut header = Vec::with_capacity(len as usize);
    file.take(len)
        .read_to_end(&mut header)
        .map_err(|e| PipelineError::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| malformed(format!("the safetensors header is not valid JSON: {e}")))?;
    let mut total = 0u64;
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| malformed(format!("tensor {name} has no shape in the header")))?;
        let mut elements = 1u64;
        for dim in shape {
            let dim = dim
                .as_u64()
                .ok_or_else(|| malformed(format!("tensor {name} has a bad shape {shape:?}")))?;
            elements = elements.saturating_mul(dim);
        }
        total = total.saturating_add(elements);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_bytes_count_every_tensor_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        super::super::write_tiny_model(dir.path()).unwrap();
        let bytes = resident_bytes(dir.path()).unwrap();
        // The tiny model's files are f32, so the estimate is their size less headers.
        let files = ModelFiles::locate(dir.path()).unwrap();
        let on_disk: u64 = files
            .read_set()
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .map(|f| std::fs::metadata(files.path(f)).unwrap().len())
            .sum();
        assert!(bytes > 0 && bytes <= on_disk, "{bytes} vs {on_disk}");
        assert!(
            on_disk - bytes < 200_000,
            "headers are small: {bytes} vs {on_disk}"
        );
    }

    #[test]
    fn malformed_headers_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        std::fs::write(&path, [0xff; 16]).unwrap();
        let e = tensor_elements(&path).unwrap_err();
        assert!(e.to_string().contains("x.safetensors"), "{e}");
    }

    #[test]
    fn the_tokenizer_loads_alone() {
        let dir = tempfile::tempdir().unwrap();
        super::super::write_tiny_model(dir.path()).unwrap();
        let t = PromptTokenizer::load(dir.path()).unwrap();
        assert_eq!(t.window(), 77);
        let tokens = t.tokens("a red car").unwrap();
        assert!(!tokens.is_empty());
        let missing = PromptTokenizer::load(&dir.path().join("nowhere")).unwrap_err();
        assert!(
            matches!(missing, PipelineError::Tokenizer { .. }),
            "{missing}"
        );
    }
}
