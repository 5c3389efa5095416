//! Textual-inversion embeddings: the files, the token ids that stand for their
//! vectors, and the tiny embedding of `kiln embedding tiny`.
//!
//! A file is `.safetensors` holding `emb_params` `[n, width]` (SD 1.x / 2.x, one
//! text encoder) or `clip_l` `[n, 768]` and `clip_g` `[n, 1280]` (SDXL, one
//! tensor per encoder), as the A1111 web UI and diffusers' `load_textual_inversion`
//! read them. Each embedding a pipeline loads gets `n` token ids of its own past
//! every vocabulary ([`FIRST_ID`] on), fixed for the pipeline's life and keyed by
//! the file's hash. A prompt word that names an embedding is tokenized to those
//! ids (`text_extras`), so the chunk cache, keyed by token ids, tells chunks with
//! different embeddings apart, and the CLIP encoder reads the vectors in place of
//! token embeddings at those positions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::assets::AssetFile;
use super::error::PipelineError;
use super::layout::ModelFiles;
use super::noise::{self, Purpose};
use super::weights;

/// The first token id given to embedding vectors: far past any CLIP vocabulary (49,408).
pub(crate) const FIRST_ID: u32 = 1 << 30;

/// One loaded embedding.
#[derive(Debug)]
pub(crate) struct Embedding {
    /// The token id of its first vector; the others follow.
    pub(crate) first_id: u32,
    /// Per text encoder, the vectors `[n, width]` in the encoder's dtype, on its device.
    pub(crate) vectors: Vec<Tensor>,
}

impl Embedding {
    /// Returns the number of vectors (tokens) it stands for.
    pub(crate) fn len(&self) -> usize {
        self.vectors
            .first()
            .map(|v| v.dim(0).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Returns vector `id - first_id` for text encoder `encoder`, if `id` is one of its ids.
    pub(crate) fn vector(&self, encoder: usize, id: u32) -> Option<Tensor> {
        let k = id.checked_sub(self.first_id)? as usize;
        if k >= self.len() {
            return None;
        }
        self.vectors.get(encoder)?.get(k).ok()
    }
}

/// The embeddings a pipeline has loaded, by file hash.
#[derive(Debug)]
pub(crate) struct Registry {
    /// Widths of the text encoders, `text_encoder` first.
    widths: Vec<usize>,
    /// The encoders' dtype.
    dtype: DType,
    /// Their device.
    device: Device,
    /// Loaded embeddings and the next free id. A std mutex: held while one small
    /// file is read, which only the first use of an embedding does.
    table: Mutex<(HashMap<String, Arc<Embedding>>, u32)>,
}

impl Registry {
    /// Returns an empty registry for text encoders of these widths.
    pub(crate) fn new(widths: Vec<usize>, dtype: DType, device: &Device) -> Self {
        Self {
            widths,
            dtype,
            device: device.clone(),
            table: Mutex::new((HashMap::new(), FIRST_ID)),
        }
    }

    /// Returns the embedding in `file`, loading it on first use.
    ///
    /// # Errors
    ///
    /// `Io` or `Weights` when the file cannot be read, lacks the tensor this model's
    /// encoders need (naming it), or has vectors of the wrong width.
    pub(crate) fn get(&self, file: &AssetFile) -> Result<Arc<Embedding>, PipelineError> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = table.0.get(&file.hash) {
            return Ok(Arc::clone(e));
        }
        let vectors = read(&file.path, &self.widths, self.dtype, &self.device)?;
        let n = vectors.first().map(|v| v.dim(0)).transpose()?.unwrap_or(0) as u32;
        let embedding = Arc::new(Embedding {
            first_id: table.1,
            vectors,
        });
        table.1 = table.1.saturating_add(n);
        table.0.insert(file.hash.clone(), Arc::clone(&embedding));
        Ok(embedding)
    }
}

/// The tensor names of an embedding for a model with `encoders` text encoders.
fn tensor_names(encoders: usize) -> &'static [&'static str] {
    if encoders == 2 {
        &["clip_l", "clip_g"]
    } else {
        &["emb_params"]
    }
}

/// Reads an embedding's vectors, one `[n, width]` tensor per text encoder.
fn read(
    file: &Path,
    widths: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Vec<Tensor>, PipelineError> {
    let tensors = weights::map_file(file)?;
    let err = |message: String| PipelineError::Weights {
        file: file.to_path_buf(),
        message,
    };
    let mut out = Vec::with_capacity(widths.len());
    for (name, &width) in tensor_names(widths.len()).iter().zip(widths) {
        let view = tensors.get(name).map_err(|_| {
            err(format!(
                "tensor {name} is missing: an embedding for this model holds {}",
                tensor_names(widths.len()).join(" and ")
            ))
        })?;
        let shape = view.shape().to_vec();
        if shape.len() != 2 || shape[1] != width || shape[0] == 0 {
            return Err(err(format!(
                "tensor {name} has shape {shape:?}, expected [n, {width}] with n ≥ 1"
            )));
        }
        if let Some(first) = out.first().map(|t: &Tensor| t.dim(0)).transpose()?
            && first != shape[0]
        {
            return Err(err(format!(
                "tensor {name} has {} vectors, {} has {first}",
                shape[0],
                tensor_names(widths.len())[0]
            )));
        }
        let t = tensors
            .load(name, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| err(format!("tensor {name} cannot be loaded: {e}")))?;
        out.push(t);
    }
    Ok(out)
}

/// Writes a random 2-vector embedding that fits the model in `model` to `out`
/// (`emb_params`, or `clip_l` + `clip_g` for a model with two text encoders).
/// The vectors are N(0, 1), like the tiny models' token embeddings, from kiln's
/// portable generator keyed by `seed`: the same bytes every time.
///
/// # Errors
///
/// `Io` when the model cannot be read or the file written; `Config` for a folder
/// that is not a diffusers model.
pub fn write_tiny_embedding(model: &Path, out: &Path, seed: u64) -> Result<(), PipelineError> {
    const VECTORS: usize = 2;
    let files = ModelFiles::locate(model)?;
    let spec = super::config::read_model(&files)?;
    let names = tensor_names(spec.text.len());
    let mut tensors = HashMap::new();
    for (i, (name, text)) in names.iter().zip(&spec.text).enumerate() {
        let width = text.config.hidden_size;
        let values = noise::standard_normal(
            seed,
            Purpose::Weights(0x454d_0000 + i as u32),
            0,
            VECTORS * width,
        );
        tensors.insert(
            name.to_string(),
            Tensor::from_vec(values, (VECTORS, width), &Device::Cpu)?,
        );
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| PipelineError::io(parent, e))?;
    }
    candle_core::safetensors::save(&tensors, out).map_err(|e| PipelineError::Weights {
        file: out.to_path_buf(),
        message: format!("cannot be written: {e}"),
    })
}
