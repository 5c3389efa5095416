//! The memory of the GPU the worker renders on, read at each scrape for
//! `kiln_device_memory_bytes` ([`crate::metrics::DEVICE_MEMORY_BYTES`]).
//!
//! [`probe`] gives a [`DeviceMemoryProbe`] for a CUDA device on builds with
//! the `cuda` feature (the driver's `cuMemGetInfo` through cudarc), and
//! nothing for the CPU, Metal, or any device of a build without it: the
//! metric is then absent. Like `nvidia-smi`, the reading is device-wide:
//! `used` counts every process's allocations and the memory candle's
//! allocator keeps cached, not only the tensors alive now.

use std::sync::Arc;

use candle_core::Device;

/// One reading of a device's memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes in use (total less free).
    pub used: u64,
    /// Bytes the device has.
    pub total: u64,
}

/// A device's memory could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the memory of {device}: {reason}")]
pub struct DeviceMemoryError {
    /// The device, as `--device` names it.
    pub device: String,
    /// What the driver said.
    pub reason: String,
}

/// Reads the memory of one device.
pub trait DeviceMemoryProbe: Send + Sync {
    /// The device as `--device` names it (`cuda:0`): the metric's `device` label.
    fn device(&self) -> &str;

    /// Reads the device's memory now.
    ///
    /// # Errors
    /// When the driver cannot tell.
    fn read(&self) -> Result<DeviceMemory, DeviceMemoryError>;
}

/// Returns the probe of `device`'s memory: `Some` for a CUDA device on a
/// build with the `cuda` feature, `None` otherwise.
pub fn probe(device: &Device) -> Option<Arc<dyn DeviceMemoryProbe>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return Some(Arc::new(cuda::CudaProbe::new(cuda)));
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The CUDA probe: `cuMemGetInfo` in the device's context.

    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::CudaContext;

    use super::{DeviceMemory, DeviceMemoryError, DeviceMemoryProbe};

    /// Reads a CUDA device's memory through its candle context.
    pub(super) struct CudaProbe {
        context: Arc<CudaContext>,
        name: String,
    }

    impl CudaProbe {
        /// The probe of `device`.
        pub(super) fn new(device: &candle_core::CudaDevice) -> Self {
            let context = device.cuda_stream().context().clone();
            let name = format!("cuda:{}", context.ordinal());
            Self { context, name }
        }
    }

    impl DeviceMemoryProbe for CudaProbe {
        fn device(&self) -> &str {
            &self.name
        }

        fn read(&self) -> Result<DeviceMemory, DeviceMemoryError> {
            // Binds the context to the calling thread (a scrape's), then asks the driver.
            let (free, total) = self.context.mem_get_info().map_err(|e| DeviceMemoryError {
                device: self.name.clone(),
                reason: e.to_string(),
            })?;
            Ok(DeviceMemory {
                used: total.saturating_sub(free) as u64,
                total: total as u64,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_device_memory_probe() {
        assert!(probe(&Device::Cpu).is_none());
    }
}
