//! The LoRAs, embeddings and ControlNets a worker (or `kiln render`) can apply:
//! names, files and content hashes, found once at startup.
//!
//! A LoRA's or embedding's name is its file stem (`mira-v3.safetensors` is
//! `mira-v3`), found in the `--lora-dir` / `--embedding-dir` folders (not
//! recursively); a ControlNet's name is given with it (`--controlnet NAME=PATH`,
//! a diffusers folder or a single `.safetensors` file). Hashes are the sha256 of
//! the file (for a ControlNet folder, of its config and weights' hashes): what the
//! worker announces and the recipe records.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::PipelineError;

/// One LoRA, embedding or ControlNet on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssetFile {
    /// The name recipes use.
    pub name: String,
    /// The file (or, for a ControlNet, possibly a diffusers folder).
    pub path: PathBuf,
    /// Content hash, sha256 hex.
    pub hash: String,
}

/// Every LoRA, embedding and ControlNet one process holds, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assets {
    /// LoRAs by name.
    pub loras: BTreeMap<String, AssetFile>,
    /// Textual-inversion embeddings by name.
    pub embeddings: BTreeMap<String, AssetFile>,
    /// ControlNets by name.
    pub controlnets: BTreeMap<String, AssetFile>,
}

impl Assets {
    /// Finds the `.safetensors` files of the LoRA and embedding folders and hashes
    /// them and the named ControlNets.
    ///
    /// # Errors
    ///
    /// `Io` for a folder or file that cannot be read; `Config` when two files of one
    /// kind have the same name (naming both) or a ControlNet name is given twice.
    pub fn scan(
        lora_dirs: &[PathBuf],
        embedding_dirs: &[PathBuf],
        controlnets: &[(String, PathBuf)],
    ) -> Result<Assets, PipelineError> {
        let mut out = Assets {
            loras: scan_dirs(lora_dirs)?,
            embeddings: scan_dirs(embedding_dirs)?,
            controlnets: BTreeMap::new(),
        };
        for (name, path) in controlnets {
            let hash = if path.is_dir() {
                model_hash_of_controlnet(path)?
            } else {
                file_hash(path)?
            };
            let file = AssetFile {
                name: name.clone(),
                path: path.clone(),
                hash,
            };
            if let Some(before) = out.controlnets.insert(name.clone(), file) {
                return Err(PipelineError::Config {
                    path: path.clone(),
                    message: format!(
                        "ControlNet name {name} is given twice (also {})",
                        before.path.display()
                    ),
                });
            }
        }
        Ok(out)
    }

    /// Returns true when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.loras.is_empty() && self.embeddings.is_empty() && self.controlnets.is_empty()
    }
}

/// The `.safetensors` files of `dirs` by stem; a stem found twice is an error.
fn scan_dirs(dirs: &[PathBuf]) -> Result<BTreeMap<String, AssetFile>, PipelineError> {
    let mut out: BTreeMap<String, AssetFile> = BTreeMap::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).map_err(|e| PipelineError::io(dir, e))?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| PipelineError::io(dir, e))?;
            let path = entry.path();
            if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
                paths.push(path);
            }
        }
        paths.sort();
        for path in paths {
            let Some(name) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let hash = file_hash(&path)?;
            if let Some(before) = out.get(&name) {
                return Err(PipelineError::Config {
                    path: path.clone(),
                    message: format!("name {name} is also {}", before.path.display()),
                });
            }
            out.insert(name.clone(), AssetFile { name, path, hash });
        }
    }
    Ok(out)
}

/// sha256 hex of one file.
pub fn file_hash(path: &Path) -> Result<String, PipelineError> {
    let mut file = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| PipelineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The hash of a diffusers ControlNet folder: sha256 of its
/// `diffusion_pytorch_model.safetensors` and `config.json`, framed as model folders are.
fn model_hash_of_controlnet(dir: &Path) -> Result<String, PipelineError> {
    let mut hasher = Sha256::new();
    for rel in ["config.json", "diffusion_pytorch_model.safetensors"] {
        let path = dir.join(rel);
        let h = file_hash(&path)?;
        hasher.update(rel.as_bytes());
        hasher.update([0u8]);
        hasher.update(h.as_bytes());
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_names_files_by_stem_and_refuses_duplicates() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("mira.safetensors"), b"one").unwrap();
        std::fs::write(a.path().join("notes.txt"), b"x").unwrap();
        std::fs::write(b.path().join("ink.safetensors"), b"two").unwrap();
        let assets = Assets::scan(&[a.path().into(), b.path().into()], &[], &[]).unwrap();
        assert_eq!(assets.loras.keys().collect::<Vec<_>>(), ["ink", "mira"]);
        assert_eq!(
            assets.loras["mira"].hash,
            hex::encode(Sha256::digest(b"one"))
        );
        std::fs::write(b.path().join("mira.safetensors"), b"three").unwrap();
        let err = Assets::scan(&[a.path().into(), b.path().into()], &[], &[]).unwrap_err();
        assert!(err.to_string().contains("mira"), "{err}");
    }
}
