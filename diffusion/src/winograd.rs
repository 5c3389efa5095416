//! Winograd F(2×2, 3×3): a 3×3, stride-1, padding-1 convolution with 2.25× fewer
//! multiplications than im2col, for the CPU path of [`crate::conv`].
//!
//! The output is cut into 2×2 tiles. Each tile's 4×4 input patch `d` and each 3×3
//! kernel `g` are taken to a 4×4 transform domain (`V = Bᵀ d B`, `U = G g Gᵀ`), where
//! the convolution is an element-wise product summed over input channels: for each of
//! the 16 positions `ξ`, one matrix product `M[ξ] = U[ξ] · V[ξ]` of `[c_out, c_in]` by
//! `[c_in, tiles]`. The tile's 2×2 output is `Aᵀ M A` (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2015). That is 16 products per
//! tile and channel pair against 36 for the direct form; the transforms are additions
//! only, linear in the channels.
//!
//! The weight transform runs per call, not at load: kept, `U` would be 16/9 the size
//! of the weights (about 1 GB more for an SD-1.5 UNet). It costs `16·c_out·c_in`
//! writes per call, so small images (few tiles per weight) stay on im2col
//! ([`applies`]). Inputs are transformed per band of tile rows into one buffer reused across
//! bands and images, as im2col does; results do not depend on the thread count or the
//! batch. The sums run in another order than im2col's, so values differ in the last
//! bits (about 1e-6 relative, measured by the tests against candle's convolution).

use rayon::prelude::*;

/// Positions of the 4×4 transform domain.
const POSITIONS: usize = 16;

/// Fewest 2×2 output tiles per image for which the Winograd form runs: below it the
/// per-call weight transform (`16·c_out·c_in` values written) is not paid back by the
/// smaller matrix products. A UNet's 16×16 latent levels (64 tiles) stay on im2col,
/// its 32×32 ones (256 tiles) and every VAE decoder convolution take this path.
pub(crate) const MIN_TILES: usize = 256;

/// Whether a `kernel`×`kernel` convolution with this stride and padding and an
/// `out_h`×`out_w` output is computed in the Winograd form: 3×3, stride 1, padding 1,
/// and at least `min_tiles` tiles (normally [`MIN_TILES`]).
pub(crate) fn applies(
    (kernel, stride, padding): (usize, usize, usize),
    (out_h, out_w): (usize, usize),
    min_tiles: usize,
) -> bool {
    (kernel, stride, padding) == (3, 1, 1) && out_h.div_ceil(2) * out_w.div_ceil(2) >= min_tiles
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

/// A 3×3, stride-1, padding-1 convolution of one batch in the Winograd form.
pub(crate) struct Winograd<'a> {
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
        let (vh, vw) = self.visible();
        let (tiles_h, tiles_w) = (vh.div_ceil(2), vw.div_ceil(2));
        let u = sized(&mut scratch.weights, self.c_out * POSITIONS * c_in);
        self.weights(u);
        let u = &*u;
        let rows = c_in * 9 + 1;
        let bias: Vec<f32> = self
            .packed
            .chunks_exact(rows)
            .map(|r| r[c_in * 9])
            .collect();
        // Tile rows per band: the transformed inputs and products stay under band_bytes.
        let per_row = POSITIONS * (c_in + c_out) * tiles_w * std::mem::size_of::<f32>();
        let band = (self.band_bytes / per_row.max(1)).clamp(1, tiles_h);
        let v = sized(&mut scratch.inputs, POSITIONS * c_in * band * tiles_w);
        let m = sized(&mut scratch.products, POSITIONS * c_out * band * tiles_w);
        let threads = rayon::current_num_threads();
        for (image, output) in input
            .chunks_exact(c_in * self.h * self.w)
            .zip(out.chunks_exact_mut(c_out * vh * vw))
        {
            for first in (0..tiles_h).step_by(band) {
                let tile_rows = first..(first + band).min(tiles_h);
                let tiles = tile_rows.len() * tiles_w;
                let v = &mut v[..POSITIONS * c_in * tiles];
                v.par_chunks_mut(POSITIONS * tiles)
                    .zip(image.par_chunks(self.h * self.w))
                    .for_each(|(dst, plane)| self.input_tiles(plane, tile_rows.clone(), dst));
                let m = &mut m[..POSITIONS * c_out * tiles];
                // v is [c_in][ξ][tiles], u [c_out][ξ][c_in], m [c_out][ξ][tiles]: the
                // ξ-th product reads and writes rows strided by 16 positions.
                assert!(u.len() == c_out * POSITIONS * c_in && v.len() == c_in * POSITIONS * tiles);
                for xi in 0..POSITIONS {
                    // SAFETY: with the assert above and m's length, every element addressed
                    // lies inside its slice: m[xi·tiles..] as c_out × tiles with row stride
                    // 16·tiles, u[xi·c_in..] as c_out × c_in with row stride 16·c_in,
                    // v[xi·tiles..] as c_in × tiles with row stride 16·tiles; m aliases neither.
                    unsafe {
                        gemm::gemm(
                            c_out,
                            tiles,
                            c_in,
                            m.as_mut_ptr().add(xi * tiles),
                            1,
                            (POSITIONS * tiles) as isize,
                            false,
                            u.as_ptr().add(xi * c_in),
                            1,
                            (POSITIONS * c_in) as isize,
                            v.as_ptr().add(xi * tiles),
                            1,
                            (POSITIONS * tiles) as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::Rayon(threads),
                        );
                    }
                }
                output
                    .par_chunks_mut(vh * vw)
                    .zip(m.par_chunks(POSITIONS * tiles))
                    .zip(bias.par_iter())
                    .for_each(|((plane, products), &b)| {
                        output_tiles(products, b, tile_rows.clone(), tiles_w, (vh, vw), plane)
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

    /// `U = G g Gᵀ` for every kernel, into `u` as `[c_out][ξ][c_in]`.
    fn weights(&self, u: &mut [f32]) {
        let (c_in, rows) = (self.c_in, self.c_in * 9 + 1);
        u.par_chunks_mut(POSITIONS * c_in)
            .zip(self.packed.par_chunks_exact(rows))
            .for_each(|(dst, kernels)| {
                for (ci, g) in kernels[..c_in * 9].chunks_exact(9).enumerate() {
                    for (xi, value) in kernel_transform(g).into_iter().enumerate() {
                        dst[xi * c_in + ci] = value;
                    }
                }
            });
    }

    /// `V = Bᵀ d B` for every tile of `tile_rows` of one input channel, into `dst`
    /// (`[ξ][tiles]`).
    fn input_tiles(&self, plane: &[f32], tile_rows: std::ops::Range<usize>, dst: &mut [f32]) {
        let (vh, vw) = self.visible();
        let tiles_w = vw.div_ceil(2);
        let tiles = tile_rows.len() * tiles_w;
        // Four input rows with one column of padding on the left and up to two on the
        // right: tile `tx` reads columns 2·tx .. 2·tx + 4.
        let width = 2 * tiles_w + 2;
        let mut rows = vec![0f32; 4 * width];
        let mut mixed = vec![0f32; 4 * width];
        let (mut even, mut odd) = (vec![0f32; tiles_w + 1], vec![0f32; tiles_w + 1]);
        for (index, ty) in tile_rows.enumerate() {
            for (r, row) in rows.chunks_exact_mut(width).enumerate() {
                // Input row 2·ty − 1 + r, zero in the padding.
                row.fill(0.0);
                let Some(y) = (2 * ty + r).checked_sub(1).filter(|&y| y < vh) else {
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
            let (r0, rest) = rows.split_at(width);
            let (r1, rest) = rest.split_at(width);
            let (r2, r3) = rest.split_at(width);
            let (m0, rest) = mixed.split_at_mut(width);
            let (m1, rest) = rest.split_at_mut(width);
            let (m2, m3) = rest.split_at_mut(width);
            for x in 0..width {
                m0[x] = r0[x] - r2[x];
                m1[x] = r1[x] + r2[x];
                m2[x] = r2[x] - r1[x];
                m3[x] = r1[x] - r3[x];
            }
            // (Bᵀ d) B: the columns' combinations. Tile `tx` reads columns 2·tx .. 2·tx + 4
            // of each mixed row, that is even[tx], odd[tx], even[tx + 1], odd[tx + 1]: split
            // into even and odd columns, every combination is a contiguous vector operation.
            let base = index * tiles_w;
            for (i, mixed_row) in mixed.chunks_exact(width).enumerate() {
                for (k, pair) in mixed_row.chunks_exact(2).enumerate() {
                    even[k] = pair[0];
                    odd[k] = pair[1];
                }
                let (e0, e1) = (&even[..tiles_w], &even[1..=tiles_w]);
                let (o0, o1) = (&odd[..tiles_w], &odd[1..=tiles_w]);
                let out = |j: usize| (4 * i + j) * tiles + base;
                let combined: [(&[f32], &[f32], f32); 4] = [
                    (e0, e1, -1.0),
                    (o0, e1, 1.0),
                    (e1, o0, -1.0),
                    (o0, o1, -1.0),
                ];
                for (j, (a, b, sign)) in combined.into_iter().enumerate() {
                    let dst = &mut dst[out(j)..out(j) + tiles_w];
                    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
                        *d = a + sign * b;
                    }
                }
            }
        }
    }
}

/// `G g Gᵀ` for one 3×3 kernel `g` (row-major), as 16 values row-major.
fn kernel_transform(g: &[f32]) -> [f32; POSITIONS] {
    let combine = |a: f32, b: f32, c: f32| [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c];
    // G g: combinations of the kernel's rows, one column at a time.
    let mut rows = [[0f32; 3]; 4];
    for col in 0..3 {
        let mixed = combine(g[col], g[3 + col], g[6 + col]);
        for (row, value) in rows.iter_mut().zip(mixed) {
            row[col] = value;
        }
    }
    // (G g) Gᵀ: combinations of each row's columns.
    let mut out = [0f32; POSITIONS];
    for (i, row) in rows.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&combine(row[0], row[1], row[2]));
    }
    out
}

/// `Aᵀ M A` plus the bias for every tile of `tile_rows` of one output channel, from
/// `products` (`[ξ][tiles]`) into `plane` (`vh`×`vw`), dropping what falls past its
/// edge.
fn output_tiles(
    products: &[f32],
    bias: f32,
    tile_rows: std::ops::Range<usize>,
    tiles_w: usize,
    (vh, vw): (usize, usize),
    plane: &mut [f32],
) {
    let tiles = tile_rows.len() * tiles_w;
    // Aᵀ M, per tile row: the sums of the products' rows 0..3 and 1..4 (with signs),
    // for each of the 4 columns, as vectors over the row's tiles.
    let mut top = vec![0f32; 4 * tiles_w];
    let mut bottom = vec![0f32; 4 * tiles_w];
    let mut pixels = vec![0f32; 2 * tiles_w];
    for (index, ty) in tile_rows.enumerate() {
        let stream = |xi: usize| &products[xi * tiles + index * tiles_w..][..tiles_w];
        for j in 0..4 {
            let (m0, m1, m2, m3) = (stream(j), stream(4 + j), stream(8 + j), stream(12 + j));
            let top = &mut top[j * tiles_w..][..tiles_w];
            let bottom = &mut bottom[j * tiles_w..][..tiles_w];
            for t in 0..tiles_w {
                top[t] = m0[t] + m1[t] + m2[t];
                bottom[t] = m1[t] - m2[t] - m3[t];
            }
        }
        // (Aᵀ M) A: each output row's two pixels per tile, interleaved, cut at the edge.
        for (dy, sums) in [&top, &bottom].into_iter().enumerate() {
            let y = 2 * ty + dy;
            if y >= vh {
                break;
            }
            let (r0, rest) = sums.split_at(tiles_w);
            let (r1, rest) = rest.split_at(tiles_w);
            let (r2, r3) = rest.split_at(tiles_w);
            for (t, pair) in pixels.chunks_exact_mut(2).enumerate() {
                pair[0] = r0[t] + r1[t] + r2[t] + bias;
                pair[1] = r1[t] - r2[t] - r3[t] + bias;
            }
            plane[y * vw..(y + 1) * vw].copy_from_slice(&pixels[..vw]);
        }
    }
}
