//! Builds candle modules from memory-mapped safetensors, naming the tensor at fault.
//!
//! candle's own safetensors backend reports a missing tensor without the file
//! and a wrong shape in a message that may carry a backtrace. kiln wraps the
//! memory-mapped file in a backend that records the first tensor it could not
//! serve, so a failed build becomes `PipelineError::Weights` naming the file
//! and the tensor.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::error::PipelineError;

/// A safetensors file whose lookups record what went wrong.
struct RecordingBackend {
    /// The mapped file.
    tensors: MmapedSafetensors,
    /// The latest failed lookup (tensor name, what was wrong), shared with `build`
    /// because the `VarBuilder` owns the backend. A build stops at the first failure
    /// it does not recover from, so the latest one is the fatal one; candle's VAE
    /// attention probes a 2-D weight and falls back to 4-D under the same name, so a
    /// later success of that name clears the record.
    failure: Arc<Mutex<Option<(String, String)>>>,
}

impl RecordingBackend {
    /// Records `message` about tensor `name` and returns candle's error for it.
    fn fail(&self, name: &str, message: String) -> candle_core::Error {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((name.to_string(), message.clone()));
        candle_core::Error::Msg(format!("tensor {name}: {message}"))
    }

    /// Forgets a recorded failure for `name` once a retry of it succeeded.
    fn clear(&self, name: &str) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|(n, _)| n == name) {
            *slot = None;
        }
    }
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let view = match self.tensors.get(name) {
            Ok(view) => view,
            Err(_) => return Err(self.fail(name, "is missing".into())),
        };
        if view.shape() != shape.dims() {
            return Err(self.fail(
                name,
                format!("has shape {:?}, expected {:?}", view.shape(), shape.dims()),
            ));
        }
        let tensor = self
            .tensors
            .load(name, dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| self.fail(name, format!("cannot be loaded: {}", plain(&e))))?;
        self.clear(name);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self
            .tensors
            .load(name, dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| self.fail(name, format!("cannot be loaded: {}", plain(&e))))?;
        self.clear(name);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }
}

/// Memory-maps a safetensors file.
fn map_file(file: &Path) -> Result<MmapedSafetensors, PipelineError> {
    std::fs::metadata(file).map_err(|e| PipelineError::io(file, e))?;
    // SAFETY: the mapping is only read while the module is built: every tensor is
    // copied out of it (`MmapedSafetensors::load`) and the map is dropped when `build`
    // returns. Model files are not modified while a worker loads them; if one were
    // truncated meanwhile, reads could fault, which is the risk memmap2 documents.
    unsafe { MmapedSafetensors::new(file) }.map_err(|e| PipelineError::Weights {
        file: file.to_path_buf(),
        message: format!("not a readable safetensors file: {}", plain(&e)),
    })
}

/// Builds a module from `file` with `build`; a missing or misshapen tensor names itself.
pub(crate) fn build<T>(
    file: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T, PipelineError> {
    let failure = Arc::new(Mutex::new(None));
    let backend = RecordingBackend {
        tensors: map_file(file)?,
        failure: Arc::clone(&failure),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    build(vb).map_err(|e| {
        let recorded = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        let message = match recorded {
            Some((name, message)) => format!("tensor {name} {message}"),
            None => format!("building the model failed: {}", plain(&e)),
        };
        PipelineError::Weights {
            file: PathBuf::from(file),
            message,
        }
    })
}

/// Returns candle's message without the backtrace it may carry.
fn plain(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(inner),
        other => other.to_string(),
    }
}
