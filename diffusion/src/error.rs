//! The pipeline's error type: every variant names the file, tensor or field at fault.

use std::path::PathBuf;

/// Why loading a model or rendering an image failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Reading or writing a file failed.
    #[error("I/O error on {}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A config file is malformed or describes something the pipeline cannot run.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A weights file is unreadable, or a tensor is missing or has the wrong shape.
    #[error("{}: {message}", file.display())]
    Weights {
        /// The safetensors file.
        file: PathBuf,
        /// What is wrong, naming the tensor.
        message: String,
    },
    /// The tokenizer files cannot be loaded or a prompt cannot be tokenized.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer's complaint.
        message: String,
    },
    /// The recipe asks for something this model cannot render.
    #[error("{field}: {message}")]
    InvalidRecipe {
        /// The recipe field.
        field: &'static str,
        /// What is wrong, with the value.
        message: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// `on_step` asked to stop.
    #[error("render cancelled")]
    Cancelled,
}

impl PipelineError {
    /// Returns an [`PipelineError::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Returns a [`PipelineError::Config`] for `path`.
    pub(crate) fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
