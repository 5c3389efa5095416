//! The C allocator's settings for a process that renders.
//!
//! A denoising step allocates and frees activations of tens of megabytes many times
//! over. With glibc's defaults each one above the (dynamic) mmap threshold is a fresh
//! mapping the kernel zeroes and faults in page by page, and the heap's top is given
//! back (trimmed) as soon as 128 KiB of it is free, only to be asked for again by the
//! next layer. Measured on a 256 px SD-1.5-shaped decode (`kiln bench pipeline`,
//! alternating runs on a quiet machine): system time 7.2 s → 4.7–5.2 s, VAE decode
//! −7%, UNet step −4%, peak RSS +20 MB. Allocations above 32 MiB (model weights,
//! the largest activations) still get their own mapping and go back to the system
//! when freed.

/// Below this size, blocks come from the heap and are reused: 32 MiB, glibc's largest
/// dynamic threshold, fixed so it does not depend on what was freed before.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free bytes at the heap's top kept rather than trimmed: 1 GiB.
const TRIM_THRESHOLD: i32 = 1 << 30;
/// Extra bytes asked of the kernel whenever the heap grows: 256 MiB (touched, and so
/// counted in the resident size, only when used).
const TOP_PAD: i32 = 256 << 20;

/// A malloc setting glibc refused (`mallopt` returned 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The `M_*` parameter.
    pub param: i32,
    /// The value asked for.
    pub value: i32,
}

/// Sets glibc malloc's thresholds for rendering, unless the operator set any malloc
/// tunable in `GLIBC_TUNABLES` (theirs win). Does nothing on other C libraries.
/// Call it once at start-up, before the first render and before other threads
/// start; it returns the settings glibc refused, for the caller to log once its
/// logging is up.
pub fn tune_for_rendering() -> Vec<Refused> {
    let mut refused = Vec::new();
    let operator = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if operator.contains("glibc.malloc.") {
        return refused;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (param, value) in [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (libc::M_TOP_PAD, TOP_PAD),
    ] {
        // SAFETY: mallopt only changes the allocator's parameters; it takes the
        // allocator's own lock and is safe to call while other threads allocate.
        let accepted = unsafe { libc::mallopt(param, value) };
        if accepted != 1 {
            refused.push(Refused { param, value });
        }
    }
    refused
}

/// Logs what [`tune_for_rendering`] reported refused, as warnings.
pub fn log_refused(refused: &[Refused]) {
    for r in refused {
        tracing::warn!(
            param = r.param,
            value = r.value,
            "glibc refused a malloc setting"
        );
    }
}
