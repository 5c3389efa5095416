//! The allocators of a process that renders: glibc's heap, tuned for large
//! activations, and mimalloc for small blocks ([`SplitAllocator`]).
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

use std::alloc::{GlobalAlloc, Layout, System};

use mimalloc::MiMalloc;

/// Blocks smaller than this come from mimalloc, larger ones from the C heap:
/// 64 KiB. Below it live the serving path's gRPC frames (16 KiB), encoded
/// images of small renders, strings and maps; above it, a render's
/// activations and weights, whose heap `tune_for_rendering` sets up.
pub const SMALL_BLOCK: usize = 64 << 10;

/// The global allocator of `kiln` and `kiln-worker`: blocks below
/// [`SMALL_BLOCK`] from mimalloc, the rest from the C heap (glibc, tuned by
/// [`tune_for_rendering`]).
///
/// A process that renders also serves: `kiln bench dispatch` and the
/// embedded farm run a coordinator and its workers, a worker its gRPC link.
/// Their many small, short-lived blocks cost glibc's `malloc`/`free` about a
/// fifth of the dispatch path's CPU (ARCHITECTURE.md, "Dispatch rate"), which
/// is why `kiln-coordinator` uses mimalloc alone. A render's activations are
/// tuned for glibc's heap, so they stay there.
///
/// Which allocator owns a block follows from its size alone, which Rust
/// passes again on `dealloc` and `realloc`: a `realloc` that crosses
/// [`SMALL_BLOCK`] moves the block to the other allocator.
pub struct SplitAllocator;

fn small(size: usize) -> bool {
    size < SMALL_BLOCK
}

// SAFETY: every block is allocated and freed by the same allocator, chosen by
// the block's size, which the caller passes unchanged to `dealloc` and (as the
// old size) to `realloc` (GlobalAlloc's contract). Both allocators honour any
// alignment a `Layout` asks.
unsafe impl GlobalAlloc for SplitAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        unsafe {
            if small(layout.size()) {
                MiMalloc.alloc(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        unsafe {
            if small(layout.size()) {
                MiMalloc.alloc_zeroed(layout)
            } else {
                System.alloc_zeroed(layout)
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from the allocator its size names (see above).
        unsafe {
            if small(layout.size()) {
                MiMalloc.dealloc(ptr, layout)
            } else {
                System.dealloc(ptr, layout)
            }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (was_small, is_small) = (small(layout.size()), small(new_size));
        // SAFETY: within one allocator the call is forwarded as made; across
        // the boundary the block is copied into a new one of the other
        // allocator (the smaller of the two sizes) and the old one freed.
        unsafe {
            match (was_small, is_small) {
                (true, true) => MiMalloc.realloc(ptr, layout, new_size),
                (false, false) => System.realloc(ptr, layout, new_size),
                _ => {
                    let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates `size` bytes through `SplitAllocator` directly (not as the
    /// global allocator), fills them with a pattern, grows or shrinks the
    /// block through each size of `sizes` and checks the pattern survived.
    fn round_trip(sizes: &[usize]) {
        let a = SplitAllocator;
        let mut layout = Layout::from_size_align(sizes[0], 16).unwrap();
        // SAFETY: every pointer is used within its block's size and freed
        // once, with the layout it has at that point.
        unsafe {
            let mut p = a.alloc(layout);
            assert!(!p.is_null());
            for i in 0..layout.size() {
                *p.add(i) = (i % 251) as u8;
            }
            let mut kept = layout.size();
            for &size in &sizes[1..] {
                p = a.realloc(p, layout, size);
                assert!(!p.is_null());
                assert_eq!(p as usize % 16, 0, "realloc to {size} lost the alignment");
                kept = kept.min(size);
                for i in 0..kept {
                    assert_eq!(
                        *p.add(i),
                        (i % 251) as u8,
                        "byte {i} after realloc to {size}"
                    );
                }
                layout = Layout::from_size_align(size, 16).unwrap();
            }
            a.dealloc(p, layout);
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_within_and_across_the_boundary() {
        // Small to small, large to large, and across SMALL_BLOCK both ways.
        round_trip(&[100, 4000, SMALL_BLOCK - 1]);
        round_trip(&[SMALL_BLOCK, 4 * SMALL_BLOCK, SMALL_BLOCK + 1]);
        round_trip(&[
            1000,
            SMALL_BLOCK,
            3 * SMALL_BLOCK,
            50,
            SMALL_BLOCK - 1,
            SMALL_BLOCK,
        ]);
    }

    #[test]
    fn zeroed_blocks_are_zero_on_both_sides() {
        let a = SplitAllocator;
        for size in [64, SMALL_BLOCK - 8, SMALL_BLOCK, 2 * SMALL_BLOCK] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: read within the block, freed once with its layout.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % 64, 0);
                assert!((0..size).all(|i| *p.add(i) == 0), "{size} bytes not zeroed");
                a.dealloc(p, layout);
            }
        }
    }
}
