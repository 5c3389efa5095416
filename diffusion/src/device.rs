//! The devices the candle renderer can run on, and the determinism class of
//! a device and precision.

use candle_core::Device;

use crate::Precision;
use crate::output::PIPELINE_VERSION;

/// Returns the determinism class of this machine's candle backend and the
/// precision: bytes are only promised equal within one class (CPU kernels
/// differ by instruction set, f16 rounds differently from f32), e.g.
/// `candle/cpu-x86_64+avx512f+avx2+fma/f16/pipeline-3`.
pub fn determinism_class(device: &Device, precision: Precision) -> String {
    let backend = match device {
        Device::Cpu => {
            let mut features: Vec<&str> = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    features.push("avx512f");
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    features.push("avx2");
                }
                if std::arch::is_x86_feature_detected!("fma") {
                    features.push("fma");
                }
            }
            let mut name = format!("cpu-{}", std::env::consts::ARCH);
            for f in features {
                name.push('+');
                name.push_str(f);
            }
            name
        }
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    };
    format!("candle/{backend}/{precision}/pipeline-{PIPELINE_VERSION}")
}

/// Why `--device` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Not a device name kiln knows.
    #[error("--device must be cpu, cuda, cuda:N, metal or metal:N, got {0:?}")]
    Unknown(String),
    /// The device's backend was not compiled into this binary.
    #[error(
        "--device {device}: this binary was built without the {feature} feature; \
         rebuild it with `cargo build --release --features {feature}`"
    )]
    NotBuilt {
        /// The device asked for.
        device: String,
        /// The cargo feature that selects its backend.
        feature: &'static str,
    },
    /// The backend is there but the device cannot be opened (no such GPU, no driver).
    #[error("--device {device}: {source}")]
    Unavailable {
        /// The device asked for.
        device: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Opens the device named by `--device`: `cpu`, `cuda` (= `cuda:0`),
/// `cuda:N`, `metal` or `metal:N`. CUDA and Metal need the `cuda` or `metal`
/// cargo feature; without it the error says how to rebuild.
///
/// # Errors
/// [`DeviceError`] naming the device.
pub fn open_device(name: &str) -> Result<Device, DeviceError> {
    let unknown = || DeviceError::Unknown(name.to_string());
    let ordinal = |rest: Option<&str>| match rest {
        None => Ok(0),
        Some(n) => n.parse::<usize>().map_err(|_| unknown()),
    };
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let (backend, rest) = match name.split_once(':') {
        Some((backend, n)) => (backend, Some(n)),
        None => (name, None),
    };
    match backend {
        "cuda" => open_cuda(name, ordinal(rest)?),
        "metal" => open_metal(name, ordinal(rest)?),
        _ => Err(unknown()),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(name: &str, ordinal: usize) -> Result<Device, DeviceError> {
    Device::new_cuda(ordinal).map_err(|source| DeviceError::Unavailable {
        device: name.to_string(),
        source,
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(name: &str, _ordinal: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        device: name.to_string(),
        feature: "cuda",
    })
}

#[cfg(feature = "metal")]
fn open_metal(name: &str, ordinal: usize) -> Result<Device, DeviceError> {
    Device::new_metal(ordinal).map_err(|source| DeviceError::Unavailable {
        device: name.to_string(),
        source,
    })
}

#[cfg(not(feature = "metal"))]
fn open_metal(name: &str, _ordinal: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        device: name.to_string(),
        feature: "metal",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_missing_backends_say_how_to_rebuild() {
        assert!(matches!(open_device("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:x", "cuda:", "tpu:0"] {
            assert!(
                matches!(open_device(bad), Err(DeviceError::Unknown(_))),
                "{bad}"
            );
        }
        #[cfg(not(feature = "cuda"))]
        {
            let e = open_device("cuda:1").unwrap_err();
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
        #[cfg(not(feature = "metal"))]
        assert!(matches!(
            open_device("metal"),
            Err(DeviceError::NotBuilt {
                feature: "metal",
                ..
            })
        ));
    }
}
