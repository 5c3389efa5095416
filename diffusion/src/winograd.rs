//! Winograd forms F(2×2, 3×3) and F(4×4, 3×3): a 3×3, stride-1, padding-1
//! convolution with 2.25× or 4× fewer multiplications than im2col, for the CPU path
//! of [`crate::conv`].
//!
//! The output is cut into m×m tiles (m = 2 or 4). Each tile's n×n input patch `d`
//! (n = m + 2) and each 3×3 kernel `g` are taken to an n×n transform domain
//! (`V = Bᵀ d B`, `U = G g Gᵀ`), where the convolution is an element-wise product
//! summed over input channels: for each of the n² positions `ξ`, one matrix product
//! `M[ξ] = U[ξ] · V[ξ]` of `[c_out, c_in]` by `[c_in, tiles]`. The tile's m×m output
//! is `Aᵀ M A` (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2015). That is n² products per tile and channel pair, for m² outputs: 16 for 4
//! outputs in F(2×2, 3×3), 36 for 16 in F(4×4, 3×3), against 9 per output for the
//! direct form; the transforms are sums with small constant factors, linear in the
//! channels.
//!
//! The weight transform runs per call, not at load: kept, `U` would be n²/9 the size
//! of the weights (about 1 GB more for an SD-1.5 UNet with the smaller form). It
//! costs `n²·c_out·c_in` writes per call, so planes with few tiles stay on im2col,
//! and the larger form runs only where it has as many tiles as the smaller one needs
//! ([`form`]). Inputs are transformed per band of tile rows into one buffer reused
//! across bands and images, as im2col does; results do not depend on the thread
//! count or the batch. The sums run in another order than im2col's, so values
//! differ in the last bits: up to about 5e-7 of the output's largest value for
//! F(2×2, 3×3), up to about 5e-6 for F(4×4, 3×3), whose transforms scale by up to
//! 8 (measured by the tests against candle's convolution).

use rayon::prelude::*;

use crate::product::{Dst, Src, product};

/// One Winograd form F(m×m, 3×3): its tile side and transform matrices (row-major).
pub(crate) struct Form {
    /// Output tile side m; input patches are n = m + 2 on a side.
    m: usize,
    /// Fewest output tiles per image for which the form runs when the shape decides
    /// ([`Choice::ByShape`]): below it the per-call weight transform (`n²·c_out·c_in`
    /// values written) is not paid back by the smaller matrix products.
    min_tiles: usize,
    /// `Bᵀ`, n×n: input patch to transform domain.
    bt: &'static [f32],
    /// `G`, n×3: kernel to transform domain.
    g: &'static [f32],
    /// `Aᵀ`, m×n: transform domain to output tile.
    at: &'static [f32],
}

/// F(2×2, 3×3), interpolating at 0, ±1 and ∞: all factors are ±1 or ½.
pub(crate) const F2: Form = Form {
    m: 2,
    // Planes from 16×16: a UNet's 16×16 latent levels gain (a batch of two, 640 →
    // 640 channels: 19.2 ms against 25.1 ms with im2col; 1280 → 1280: 57 against
    // 77 ms); its 8×8 ones (16 tiles) would lose (1280 → 1280: 31 against 20 ms).
    min_tiles: 64,
    #[rustfmt::skip]
    bt: &[
        1.0, 0.0, -1.0, 0.0,
        0.0, 1.0, 1.0, 0.0,
        0.0, -1.0, 1.0, 0.0,
        0.0, 1.0, 0.0, -1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0, 0.0, 0.0,
        0.5, 0.5, 0.5,
        0.5, -0.5, 0.5,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, -1.0,
    ],
};

/// F(4×4, 3×3), interpolating at 0, ±1, ±2 and ∞.
pub(crate) const F4: Form = Form {
    m: 4,
    // Planes from 32×32 (8×8 tiles), where it beats F(2×2, 3×3) (320 → 320 channels,
    // a batch of two: 13.0 ms against 15.8 ms; 640 → 640: 38 against 48 ms); on
    // 16×16 (16 tiles) it would lose to it (1280 → 1280: 69 against 57 ms).
    min_tiles: 64,
    #[rustfmt::skip]
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0,
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0,
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0,
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0,
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0,
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0 / 4.0, 0.0, 0.0,
        -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0,
        -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
        1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0,
        1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0,
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0,
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
};

impl std::fmt::Debug for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F({m}x{m}, 3x3)", m = self.m)
    }
}

impl Form {
    /// Input patch side.
    const fn n(&self) -> usize {
        self.m + 2
    }

    /// Positions of the transform domain.
    const fn positions(&self) -> usize {
        self.n() * self.n()
    }

    /// Tiles of an `out_h`×`out_w` output.
    fn tiles(&self, (out_h, out_w): (usize, usize)) -> usize {
        out_h.div_ceil(self.m) * out_w.div_ceil(self.m)
    }
}

/// Which form a convolution uses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Choice {
    /// The largest form with at least its `min_tiles` tiles, else none (im2col).
    ByShape,
    /// This form wherever it applies (3×3, stride 1, padding 1), for tests.
    #[cfg_attr(not(test), allow(dead_code))]
    Always(&'static Form),
}

/// The form a `kernel`×`kernel` convolution with this stride and padding and an
/// `out_h`×`out_w` output is computed in, if any: only 3×3, stride 1, padding 1.
pub(crate) fn form(
    choice: Choice,
    (kernel, stride, padding): (usize, usize, usize),
    out: (usize, usize),
) -> Option<&'static Form> {
    if (kernel, stride, padding) != (3, 1, 1) {
        return None;
    }
    match choice {
        Choice::Always(form) => Some(form),
        Choice::ByShape => [&F4, &F2].into_iter().find(|f| f.tiles(out) >= f.min_tiles),
    }
}

/// A thread's buffers for the transformed weights, inputs and products, kept between
/// calls: every element used is written before it is read, so they are reused as they
/// are, without the zeroing and page faults of fresh allocations. They grow to the
/// largest convolution the thread ran (tens of megabytes for a VAE decoder) and are
/// freed with the thread.
#[derive(Default)]
struct Scratch {
    weights: Vec<f32>,
    inputs: Vec<f32>,
    products: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The first `len` elements of `buffer`, grown (with zeros) if it is shorter.
fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// `dst = Σ coefficients[j] · source(j)` over the nonzero coefficients, in order, as
/// one vector operation per term. The first term is assigned, not added to zero, and
/// factors of ±1 are exact, so an F(2×2, 3×3) combination gives the bits of its
/// written-out sums and differences.
#[inline(always)]
fn combine<'a>(dst: &mut [f32], coefficients: &[f32], source: impl Fn(usize) -> &'a [f32]) {
    let mut first = true;
    for (j, &c) in coefficients.iter().enumerate() {
        if c == 0.0 {
            continue;
        }
        let src = &source(j)[..dst.len()];
        if first {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = c * s;
            }
            first = false;
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d += c * s;
            }
        }
    }
    if first {
        dst.fill(0.0);
    }
}

/// Defines the method `$name`, which runs the `#[inline(always)]` method `$body`
/// compiled for AVX-512 or AVX2 when the CPU has them, else as it is. The transforms
/// are elementwise over tiles or channels, with no sums across vector lanes, so every
/// variant gives the same bits.
macro_rules! widest {
    ($(#[$meta:meta])* fn $name:ident(&self, $($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$meta])*
        fn $name(&self, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512(this: &Winograd<'_>, $($arg: $ty),*) {
                    this.$body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2(this: &Winograd<'_>, $($arg: $ty),*) {
                    this.$body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512(self, $($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2(self, $($arg),*) };
                }
            }
            self.$body($($arg),*)
        }
    };
}

/// A 3×3, stride-1, padding-1 convolution of one batch in a Winograd form.
pub(crate) struct Winograd<'a> {
    /// The form (tile size and transforms).
    pub form: &'static Form,
    /// `[c_out, c_in·9 + 1]`: the weight rows then the bias, as [`crate::conv`] packs them.
    pub packed: &'a [f32],
    pub c_in: usize,
    pub c_out: usize,
    /// The input plane's size (before the 2× upsampling when `upsample`).
    pub h: usize,
    pub w: usize,
    /// Whether the input is read as its 2× nearest-neighbour upsampling.
    pub upsample: bool,
    /// Largest transformed input plus product per band, in bytes.
    pub band_bytes: usize,
}

impl Winograd<'_> {
    /// Convolves `input` (NCHW, `batch·c_in·h·w`) into `out` (NCHW, same spatial size
    /// as the (upsampled) input).
    pub(crate) fn run(&self, input: &[f32], out: &mut [f32]) {
        SCRATCH.with_borrow_mut(|scratch| self.run_in(input, out, scratch));
    }

    /// [`Winograd::run`] with the calling thread's scratch buffers.
    fn run_in(&self, input: &[f32], out: &mut [f32], scratch: &mut Scratch) {
        let (c_in, c_out) = (self.c_in, self.c_out);
        let (m, positions) = (self.form.m, self.form.positions());
        let (vh, vw) = self.visible();
        let (tiles_h, tiles_w) = (vh.div_ceil(m), vw.div_ceil(m));
        let u = sized(&mut scratch.weights, self.c_out * positions * c_in);
        self.weights(u);
        let u = &*u;
        let rows = c_in * 9 + 1;
        let bias: Vec<f32> = self
            .packed
            .chunks_exact(rows)
            .map(|r| r[c_in * 9])
            .collect();
        // Tile rows per band: the transformed inputs and products stay under band_bytes.
        let per_row = positions * (c_in + c_out) * tiles_w * std::mem::size_of::<f32>();
        let band = crate::conv::band_rows(self.band_bytes, per_row, tiles_w, tiles_h);
        let v = sized(&mut scratch.inputs, positions * c_in * band * tiles_w);
        let products = sized(&mut scratch.products, positions * c_out * band * tiles_w);
        let threads = rayon::current_num_threads();
        for (image, output) in input
            .chunks_exact(c_in * self.h * self.w)
            .zip(out.chunks_exact_mut(c_out * vh * vw))
        {
            for first in (0..tiles_h).step_by(band) {
                let tile_rows = first..(first + band).min(tiles_h);
                let tiles = tile_rows.len() * tiles_w;
                let v = &mut v[..positions * c_in * tiles];
                v.par_chunks_mut(positions * tiles)
                    .zip(image.par_chunks(self.h * self.w))
                    .for_each(|(dst, plane)| self.input_tiles(plane, tile_rows.clone(), dst));
                let products = &mut products[..positions * c_out * tiles];
                // v is [c_in][ξ][tiles], u [c_out][ξ][c_in], products [c_out][ξ][tiles]:
                // the ξ-th product reads and writes rows strided by n² positions.
                for xi in 0..positions {
                    product(
                        Dst {
                            data: &mut products[xi * tiles..],
                            rs: positions * tiles,
                            cs: 1,
                            accumulate: false,
                        },
                        (c_out, tiles, c_in),
                        Src {
                            data: &u[xi * c_in..],
                            rs: positions * c_in,
                            cs: 1,
                        },
                        Src {
                            data: &v[xi * tiles..],
                            rs: positions * tiles,
                            cs: 1,
                        },
                        1.0,
                        gemm::Parallelism::Rayon(threads),
                    );
                }
                output
                    .par_chunks_mut(vh * vw)
                    .zip(products.par_chunks(positions * tiles))
                    .zip(bias.par_iter())
                    .for_each(|((plane, products), &b)| {
                        self.output_tiles(products, b, tile_rows.clone(), plane)
                    });
            }
        }
    }

    /// The input's size as the convolution sees it (upsampled or not).
    fn visible(&self) -> (usize, usize) {
        match self.upsample {
            true => (2 * self.h, 2 * self.w),
            false => (self.h, self.w),
        }
    }

    /// `U = G g Gᵀ` for every kernel, into `u` as `[c_out][ξ][c_in]`: per output
    /// channel, its kernels' nine taps are gathered into nine vectors over the input
    /// channels, so every combination is a vector operation writing a contiguous row.
    fn weights(&self, u: &mut [f32]) {
        let (c_in, rows, n) = (self.c_in, self.c_in * 9 + 1, self.form.n());
        u.par_chunks_mut(self.form.positions() * c_in)
            .zip(self.packed.par_chunks_exact(rows))
            .for_each_init(
                || (vec![0f32; 9 * c_in], vec![0f32; n * 3 * c_in]),
                |buffers, (dst, kernels)| self.weight_row(kernels, dst, buffers),
            );
    }

    widest! {
        /// `U = G g Gᵀ` for the kernels of one output channel (`kernels`, `c_in·9`
        /// taps, then the bias) into `dst` (`[ξ][c_in]`), with `buffers` for the
        /// gathered taps (`9·c_in`) and `G g` (`n·3·c_in`).
        fn weight_row(&self, kernels: &[f32], dst: &mut [f32], buffers: &mut (Vec<f32>, Vec<f32>)) => weight_row_body
    }

    /// The body of [`Winograd::weight_row`].
    #[inline(always)]
    fn weight_row_body(
        &self,
        kernels: &[f32],
        dst: &mut [f32],
        buffers: &mut (Vec<f32>, Vec<f32>),
    ) {
        let (c_in, n, g) = (self.c_in, self.form.n(), self.form.g);
        let (taps, left) = buffers;
        for (ci, kernel) in kernels[..c_in * 9].chunks_exact(9).enumerate() {
            for (k, &value) in kernel.iter().enumerate() {
                taps[k * c_in + ci] = value;
            }
        }
        let tap = |row: usize, col: usize| &taps[(row * 3 + col) * c_in..][..c_in];
        // G g: row i, column col is Σ_k G[i][k] · g[k][col].
        for (index, dst) in left.chunks_exact_mut(c_in).enumerate() {
            let (i, col) = (index / 3, index % 3);
            combine(dst, &g[i * 3..][..3], |k| tap(k, col));
        }
        // (G g) Gᵀ: position (i, j) is Σ_k (G g)[i][k] · G[j][k].
        for (xi, dst) in dst.chunks_exact_mut(c_in).enumerate() {
            let (i, j) = (xi / n, xi % n);
            combine(dst, &g[j * 3..][..3], |k| {
                &left[(i * 3 + k) * c_in..][..c_in]
            });
        }
    }

    widest! {
        /// `V = Bᵀ d B` for every tile of `tile_rows` of one input channel, into `dst`
        /// (`[ξ][tiles]`).
        fn input_tiles(&self, plane: &[f32], tile_rows: std::ops::Range<usize>, dst: &mut [f32]) => input_tiles_body
    }

    /// The body of [`Winograd::input_tiles`].
    #[inline(always)]
    fn input_tiles_body(&self, plane: &[f32], tile_rows: std::ops::Range<usize>, dst: &mut [f32]) {
        let (m, n, bt) = (self.form.m, self.form.n(), self.form.bt);
        let (vh, vw) = self.visible();
        let tiles_w = vw.div_ceil(m);
        let tiles = tile_rows.len() * tiles_w;
        // n input rows with one column of padding on the left and at least one on the
        // right: tile `tx` reads columns m·tx .. m·tx + n.
        let width = m * (tiles_w + 1);
        let mut rows = vec![0f32; n * width];
        let mut mixed = vec![0f32; n * width];
        // A mixed row's columns by their remainder modulo m: tile `tx` reads
        // phases[j % m][tx + j / m] for j in 0..n.
        let mut phases = vec![0f32; m * (tiles_w + 1)];
        for (index, ty) in tile_rows.enumerate() {
            for (r, row) in rows.chunks_exact_mut(width).enumerate() {
                // Input row m·ty − 1 + r, zero in the padding.
                row.fill(0.0);
                let Some(y) = (m * ty + r).checked_sub(1).filter(|&y| y < vh) else {
                    continue;
                };
                let visible = &mut row[1..1 + vw];
                if self.upsample {
                    let src = &plane[(y / 2) * self.w..][..self.w];
                    for (pair, &x) in visible.chunks_mut(2).zip(src) {
                        pair.fill(x);
                    }
                } else {
                    visible.copy_from_slice(&plane[y * self.w..][..self.w]);
                }
            }
            // Bᵀ d: the rows' combinations, for all tiles of the row at once.
            for (i, mixed_row) in mixed.chunks_exact_mut(width).enumerate() {
                combine(mixed_row, &bt[i * n..][..n], |j| {
                    &rows[j * width..][..width]
                });
            }
            // (Bᵀ d) B: the columns' combinations. Split by phase, every combination is
            // a contiguous vector operation over the row's tiles.
            let base = index * tiles_w;
            for (i, mixed_row) in mixed.chunks_exact(width).enumerate() {
                deinterleave(m, mixed_row, &mut phases);
                for j in 0..n {
                    let out = (n * i + j) * tiles + base;
                    combine(&mut dst[out..out + tiles_w], &bt[j * n..][..n], |col| {
                        &phases[(col % m) * (tiles_w + 1) + col / m..][..tiles_w]
                    });
                }
            }
        }
    }

    widest! {
        /// `Aᵀ M A` plus the bias for every tile of `tile_rows` of one output channel,
        /// from `products` (`[ξ][tiles]`) into `plane` (the visible size), dropping what
        /// falls past its edge.
        fn output_tiles(&self, products: &[f32], bias: f32, tile_rows: std::ops::Range<usize>, plane: &mut [f32]) => output_tiles_body
    }

    /// The body of [`Winograd::output_tiles`].
    #[inline(always)]
    fn output_tiles_body(
        &self,
        products: &[f32],
        bias: f32,
        tile_rows: std::ops::Range<usize>,
        plane: &mut [f32],
    ) {
        let (vh, vw) = self.visible();
        let (m, n, at) = (self.form.m, self.form.n(), self.form.at);
        let tiles_w = vw.div_ceil(m);
        let tiles = tile_rows.len() * tiles_w;
        // Aᵀ M, per tile row: for each output row dy and transform column b, a vector
        // over the row's tiles.
        let mut sums = vec![0f32; m * n * tiles_w];
        let mut columns = vec![0f32; m * tiles_w];
        let mut pixels = vec![0f32; m * tiles_w];
        for (index, ty) in tile_rows.enumerate() {
            let stream = |xi: usize| &products[xi * tiles + index * tiles_w..][..tiles_w];
            for (dy, row) in sums.chunks_exact_mut(n * tiles_w).enumerate() {
                for (b, dst) in row.chunks_exact_mut(tiles_w).enumerate() {
                    combine(dst, &at[dy * n..][..n], |a| stream(n * a + b));
                }
            }
            // (Aᵀ M) A: each output row's m pixels per tile, interleaved, cut at the edge.
            for (dy, row) in sums.chunks_exact(n * tiles_w).enumerate() {
                let y = m * ty + dy;
                if y >= vh {
                    break;
                }
                for (dx, column) in columns.chunks_exact_mut(tiles_w).enumerate() {
                    combine(column, &at[dx * n..][..n], |b| {
                        &row[b * tiles_w..][..tiles_w]
                    });
                    for value in column.iter_mut() {
                        *value += bias;
                    }
                }
                interleave(m, &columns, &mut pixels);
                plane[y * vw..(y + 1) * vw].copy_from_slice(&pixels[..vw]);
            }
        }
    }
}

/// Splits `row` into its `m` phases: `phases[p·len + k] = row[m·k + p]`, with
/// `len = row.len() / m`. Written out for the forms' `m` (2 and 4), so the loops are
/// contiguous and vectorised.
#[inline(always)]
fn deinterleave(m: usize, row: &[f32], phases: &mut [f32]) {
    let len = row.len() / m;
    match m {
        2 => {
            let (p0, p1) = phases.split_at_mut(len);
            for ((pair, a), b) in row.chunks_exact(2).zip(p0).zip(p1) {
                (*a, *b) = (pair[0], pair[1]);
            }
        }
        4 => {
            let (p0, rest) = phases.split_at_mut(len);
            let (p1, rest) = rest.split_at_mut(len);
            let (p2, p3) = rest.split_at_mut(len);
            for ((((quad, a), b), c), d) in row.chunks_exact(4).zip(p0).zip(p1).zip(p2).zip(p3) {
                (*a, *b, *c, *d) = (quad[0], quad[1], quad[2], quad[3]);
            }
        }
        _ => {
            for (k, group) in row.chunks_exact(m).enumerate() {
                for (p, &value) in group.iter().enumerate() {
                    phases[p * len + k] = value;
                }
            }
        }
    }
}

/// The inverse of [`deinterleave`]: `row[m·k + p] = phases[p·len + k]`, with
/// `len = row.len() / m`.
#[inline(always)]
fn interleave(m: usize, phases: &[f32], row: &mut [f32]) {
    let len = row.len() / m;
    match m {
        2 => {
            let (p0, p1) = phases.split_at(len);
            for ((pair, a), b) in row.chunks_exact_mut(2).zip(p0).zip(p1) {
                (pair[0], pair[1]) = (*a, *b);
            }
        }
        4 => {
            let (p0, rest) = phases.split_at(len);
            let (p1, rest) = rest.split_at(len);
            let (p2, p3) = rest.split_at(len);
            for ((((quad, a), b), c), d) in row.chunks_exact_mut(4).zip(p0).zip(p1).zip(p2).zip(p3)
            {
                (quad[0], quad[1], quad[2], quad[3]) = (*a, *b, *c, *d);
            }
        }
        _ => {
            for (k, group) in row.chunks_exact_mut(m).enumerate() {
                for (p, value) in group.iter_mut().enumerate() {
                    *value = phases[p * len + k];
                }
            }
        }
    }
}
