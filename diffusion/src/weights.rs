//! Builds candle modules from memory-mapped safetensors, naming the tensor at fault.
//!
//! candle's own safetensors backend reports a missing tensor without the file
//! and a wrong shape in a message that may carry a backtrace. kiln wraps the
//! memory-mapped file in a backend that records the first tensor it could not
//! serve, so a failed build becomes `PipelineError::Weights` naming the file
//! and the tensor. The backend also records every tensor it served, so a
//! build that leaves tensors of the file unread (weights the model would
//! silently ignore) is logged, and tests can check that each tiny model's
//! loader asks for exactly the tensors in its files.
//!
//! [`build_merged`] builds the same module with LoRA deltas added to some of
//! its weights as they are loaded (in f32, then converted to the module's
//! dtype); the LoRA variants of a pipeline are built this way from the base
//! files, which are never modified.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// Every tensor served, shared with `build` like `failure`.
    served: Arc<Mutex<BTreeSet<String>>>,
    /// The file's name of each tensor the model asks for, when the file uses
    /// other names (a converted layout); a name not in it is looked up as it is.
    names: Option<HashMap<String, String>>,
    /// f32 deltas added to the file's named tensors as they are loaded (LoRA merges).
    deltas: HashMap<String, Tensor>,
}

impl RecordingBackend {
    /// Returns the file's name of the tensor the model calls `name`, and how to
    /// name it in errors.
    fn locate(&self, name: &str) -> (String, String) {
        match self.names.as_ref().and_then(|m| m.get(name)) {
            Some(file_name) => (file_name.clone(), format!("{file_name} ({name})")),
            None => (name.to_string(), name.to_string()),
        }
    }

    /// Records `message` about tensor `name` and returns candle's error for it.
    fn fail(&self, name: &str, message: String) -> candle_core::Error {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((name.to_string(), message.clone()));
        candle_core::Error::Msg(format!("tensor {name}: {message}"))
    }

    /// Loads the file's tensor `file_name` in `dtype`, with its delta added in f32
    /// first when it has one.
    fn load(&self, file_name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.tensors.load(file_name, dev)?;
        match self.deltas.get(file_name) {
            None => tensor.to_dtype(dtype),
            Some(delta) => {
                let merged = (tensor.to_dtype(DType::F32)? + delta.to_device(dev)?)?;
                merged.to_dtype(dtype)
            }
        }
    }

    /// Records that the file's tensor `file_name` was served and forgets a recorded
    /// failure of it, named `label` (a retry of it succeeded).
    fn served(&self, label: &str, file_name: &str) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|(n, _)| n == label) {
            *slot = None;
        }
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(file_name.to_string());
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
        let (file_name, label) = self.locate(name);
        let view = match self.tensors.get(&file_name) {
            Ok(view) => view,
            Err(_) => return Err(self.fail(&label, "is missing".into())),
        };
        if view.shape() != shape.dims() {
            return Err(self.fail(
                &label,
                format!("has shape {:?}, expected {:?}", view.shape(), shape.dims()),
            ));
        }
        let tensor = self
            .load(&file_name, dtype, dev)
            .map_err(|e| self.fail(&label, format!("cannot be loaded: {}", plain(&e))))?;
        self.served(&label, &file_name);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (file_name, label) = self.locate(name);
        let tensor = self
            .load(&file_name, dtype, dev)
            .map_err(|e| self.fail(&label, format!("cannot be loaded: {}", plain(&e))))?;
        self.served(&label, &file_name);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.get(&self.locate(name).0).is_ok()
    }
}

/// Memory-maps a safetensors file.
pub(crate) fn map_file(file: &Path) -> Result<MmapedSafetensors, PipelineError> {
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

/// Tensors a checkpoint may hold that no model reads: transformers' saved position ids.
fn is_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids")
}

/// Builds a module from `file` with `build`; a missing or misshapen tensor names itself.
///
/// Tensors of the file that the module never asked for are logged as a warning
/// (buffers such as `position_ids` excepted): a model that ignores weights
/// renders wrong without failing.
pub(crate) fn build<T>(
    file: &Path,
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T, PipelineError> {
    build_renamed(file, dtype, device, |_| None, build)
}

/// Returns the tensor names and shapes of a safetensors file.
pub(crate) fn tensor_shapes(file: &Path) -> Result<Vec<(String, Vec<usize>)>, PipelineError> {
    Ok(map_file(file)?
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

/// Returns the name and shape of every tensor in `file`, by name.
///
/// # Errors
///
/// `Io` or `Weights` when the file cannot be read as safetensors.
pub(crate) fn shapes(file: &Path) -> Result<BTreeMap<String, Vec<usize>>, PipelineError> {
    Ok(tensor_shapes(file)?.into_iter().collect())
}

/// [`build`] for a file in another layout: `rename` maps each of the file's tensor
/// names to the name the module asks for (`None`: not one the module reads). Errors
/// name the file's tensor and, in parentheses, the module's name for it.
pub(crate) fn build_renamed<T>(
    file: &Path,
    dtype: DType,
    device: &Device,
    rename: impl Fn(&str) -> Option<String>,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T, PipelineError> {
    build_with(file, dtype, device, rename, HashMap::new(), build)
}

/// Builds a module from `file` as [`build`] does, adding to each tensor named in
/// `deltas` its delta (f32, the tensor's shape) before converting it to `dtype`.
///
/// # Errors
///
/// As [`build`]; also `Weights` when a delta names a tensor the module never read.
pub(crate) fn build_merged<T>(
    file: &Path,
    dtype: DType,
    device: &Device,
    deltas: HashMap<String, Tensor>,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T, PipelineError> {
    build_with(file, dtype, device, |_| None, deltas, build)
}

/// [`build_renamed`] with `deltas` added as in [`build_merged`] (keyed by the file's names).
fn build_with<T>(
    file: &Path,
    dtype: DType,
    device: &Device,
    rename: impl Fn(&str) -> Option<String>,
    deltas: HashMap<String, Tensor>,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> Result<T, PipelineError> {
    let changed: BTreeSet<String> = deltas.keys().cloned().collect();
    let failure = Arc::new(Mutex::new(None));
    let served = Arc::new(Mutex::new(BTreeSet::new()));
    let tensors = map_file(file)?;
    let names: HashMap<String, String> = tensors
        .tensors()
        .into_iter()
        .filter_map(|(name, _)| rename(&name).map(|to| (to, name)))
        .collect();
    let present: BTreeSet<String> = tensors
        .tensors()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let backend = RecordingBackend {
        tensors,
        failure: Arc::clone(&failure),
        served: Arc::clone(&served),
        names: (!names.is_empty()).then_some(names),
        deltas,
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let module = build(vb).map_err(|e| {
        let recorded = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        let message = match recorded {
            Some((name, message)) => format!("tensor {name} {message}"),
            None => format!("building the model failed: {}", plain(&e)),
        };
        PipelineError::Weights {
            file: PathBuf::from(file),
            message,
        }
    })?;
    let served = std::mem::take(&mut *served.lock().unwrap_or_else(|p| p.into_inner()));
    if let Some(unread) = changed.iter().find(|n| !served.contains(*n)) {
        return Err(PipelineError::Weights {
            file: PathBuf::from(file),
            message: format!("tensor {unread} is changed by a LoRA but the model never reads it"),
        });
    }
    let unused: Vec<&String> = present
        .iter()
        .filter(|n| !served.contains(*n) && !is_buffer(n))
        .collect();
    if let Some(first) = unused.first() {
        tracing::warn!(
            file = %file.display(),
            count = unused.len(),
            first = %first,
            "the model does not read every tensor of its weights file"
        );
    }
    #[cfg(test)]
    usage::record(file, served, present);
    Ok(module)
}

/// Returns candle's message without the backtrace it may carry.
fn plain(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(inner),
        other => other.to_string(),
    }
}

/// Test support: which tensors each build asked for, per thread.
#[cfg(test)]
pub(crate) mod usage {
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    /// One build: the file, the tensors served, the tensors in the file.
    pub(crate) type Usage = (PathBuf, BTreeSet<String>, BTreeSet<String>);

    thread_local! {
        static LOG: RefCell<Vec<Usage>> = const { RefCell::new(Vec::new()) };
    }

    /// Appends one build's usage to this thread's log.
    pub(super) fn record(file: &Path, served: BTreeSet<String>, present: BTreeSet<String>) {
        LOG.with(|log| log.borrow_mut().push((file.to_path_buf(), served, present)));
    }

    /// Returns and clears this thread's log.
    pub(crate) fn take() -> Vec<Usage> {
        LOG.with(|log| std::mem::take(&mut *log.borrow_mut()))
    }
}
