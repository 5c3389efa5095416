//! Scaled dot-product attention on the CPU in query blocks with an online
//! softmax: the score matrix is never materialised.
//!
//! candle's attention (`stable_diffusion::attention`) computes the whole
//! `[batch·heads, queries, keys]` score tensor, copies the keys to scale them,
//! and runs a separate softmax pass: at 512 px the first UNet level's
//! self-attention holds 2 × 8 × 4096 × 4096 floats (1 GiB) and spends a third
//! of its time in page faults (`FIELD-NOTES.md`). [`attention`] instead takes
//! the projections as the linear layers leave them, `[batch, tokens, heads·d]`,
//! and splits the work into units of [`QUERY_BLOCK`] queries of one batch row.
//! A unit walks every head and the keys in blocks of [`KEY_BLOCK`]: one matrix
//! product gives the block's scaled scores, the running maximum and sum of each
//! query are updated (the output accumulated so far is rescaled when the maximum
//! grows), and a second product adds the block's probabilities times the values
//! into the output, which is finally divided by the sums. Units write disjoint
//! rows of the output, run in parallel on rayon, and call the single-threaded
//! `gemm` kernels candle itself uses. A unit keeps its scores, its head's
//! output and (copied once per head) its head's queries column by column (one
//! column per key or channel, one entry per query), and each batch row's values
//! are transposed once (one row of keys per value channel): `gemm` then reads
//! every operand of both products where it lies instead of packing a query or
//! value block on every call, and the softmax's maxima, exponentials and sums
//! run across the queries, one vector lane per query.
//!
//! Every number a query gets depends only on its own row, the keys and the
//! values, and the block sizes are constants: outputs do not depend on the
//! thread count or on the other rows of the batch. `exp` is a polynomial
//! (Cephes' `expf`, within 2 ulp) written so that the compiler vectorises it,
//! and each query's sum adds its keys in eight fixed lanes (by key index), so
//! the result is the same whatever vector width runs it. Devices other than the CPU and dtypes other than f32
//! use candle's operations.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::operand::contiguous_f32;
use crate::product::{Dst, Src, product};

/// Queries per unit of work. 128 rather than 64: each key and value block read
/// serves twice the queries (the 512 px UNet's first-level self-attention: 0.50 s
/// against 0.60 s a call, the same bits). A unit of many rows gets the bits it
/// would get at 64; a short last unit (a few rows) is summed by `gemm` in another
/// order, which is why the change made `PIPELINE_VERSION` 8.
const QUERY_BLOCK: usize = 128;
/// Keys per online-softmax step.
const KEY_BLOCK: usize = 512;

/// Returns softmax(scale · q·kᵀ)·v per head for `q` `[batch, queries, heads·d]`,
/// `k` `[batch, keys, heads·d]` and `v` `[batch, keys, heads·dv]`, as
/// `[batch, queries, heads·dv]` (heads side by side, as diffusers' attention
/// hands them to `to_out`).
///
/// # Errors
///
/// A candle error when the shapes do not fit together or an operation fails.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (batch, queries, width) = q.dims3()?;
    let (k_batch, keys, k_width) = k.dims3()?;
    let (v_batch, v_keys, v_width) = v.dims3()?;
    if heads == 0
        || k_batch != batch
        || v_batch != batch
        || v_keys != keys
        || k_width != width
        || !width.is_multiple_of(heads)
        || !v_width.is_multiple_of(heads)
    {
        return Err(candle_core::Error::Msg(format!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let op = Attend {
            heads,
            scale: scale as f32,
        };
        return q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    // Elsewhere: candle's operations, heads moved into the batch.
    let split = |t: &Tensor, tokens: usize, w: usize| {
        t.reshape((batch, tokens, heads, w / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (qh, kh, vh) = (
        split(q, queries, width)?,
        split(k, keys, width)?,
        split(v, keys, v_width)?,
    );
    let scores = (qh.matmul(&kh.t()?.contiguous()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&vh)?
        .transpose(1, 2)?
        .reshape((batch, queries, v_width))
}

/// The CPU kernel: `heads` and the score scale.
struct Attend {
    heads: usize,
    scale: f32,
}

/// One batch row's operands: `q` and `k` row-major with `width` floats per
/// token, the values transposed (`vt[c·keys + key]`, `v_width` rows of `keys`).
struct Operands<'a> {
    q: &'a [f32],
    k: &'a [f32],
    vt: &'a [f32],
    width: usize,
    v_width: usize,
    keys: usize,
}

impl Attend {
    /// Computes the queries `first..first + rows` of one batch row into `out`
    /// (`rows × v_width`).
    ///
    /// A key block's scores and each head's output are held column by column
    /// (query `r` of column `c` at `c·rows + r`): both products then read their
    /// operands where they lie, with no packing by `gemm` but the query block's, and
    /// the softmax runs across the queries, one vector lane per query.
    fn unit(&self, x: &Operands, first: usize, out: &mut [f32]) {
        let rows = out.len() / x.v_width;
        let (d, dv) = (x.width / self.heads, x.v_width / self.heads);
        let block = KEY_BLOCK.min(x.keys);
        let mut scores = vec![0f32; rows * block];
        let mut head_out = vec![0f32; rows * dv];
        let mut head_q = vec![0f32; rows * d];
        let mut state = Online::new(rows);
        for h in 0..self.heads {
            state.reset();
            // The head's queries column by column, so that `gemm` reads them in
            // place for every key block rather than packing them each time.
            for (r, row) in x.q[first * x.width..]
                .chunks(x.width)
                .take(rows)
                .enumerate()
            {
                for (j, q) in row[h * d..][..d].iter().enumerate() {
                    head_q[j * rows + r] = *q;
                }
            }
            for (step, start) in (0..x.keys).step_by(block).enumerate() {
                let cols = block.min(x.keys - start);
                let scores = &mut scores[..rows * cols];
                // scores = scale · q_block · k_blockᵀ
                product(
                    Dst {
                        data: scores,
                        rs: 1,
                        cs: rows,
                        accumulate: false,
                    },
                    (rows, cols, d),
                    Src {
                        data: &head_q,
                        rs: 1,
                        cs: rows,
                    },
                    Src {
                        data: &x.k[start * x.width + h * d..],
                        rs: 1,
                        cs: x.width,
                    },
                    self.scale,
                    gemm::Parallelism::None,
                );
                state.add_block(scores);
                if step > 0 {
                    for column in head_out.chunks_exact_mut(rows) {
                        for (o, c) in column.iter_mut().zip(&state.correction) {
                            *o *= c;
                        }
                    }
                }
                // head_out (+)= probabilities · v_block
                product(
                    Dst {
                        data: &mut head_out,
                        rs: 1,
                        cs: rows,
                        accumulate: step > 0,
                    },
                    (rows, dv, cols),
                    Src {
                        data: scores,
                        rs: 1,
                        cs: rows,
                    },
                    Src {
                        data: &x.vt[h * dv * x.keys + start..],
                        rs: 1,
                        cs: x.keys,
                    },
                    1.0,
                    gemm::Parallelism::None,
                );
            }
            for (r, (row, s)) in out.chunks_exact_mut(x.v_width).zip(&state.sum).enumerate() {
                for (j, o) in row[h * dv..][..dv].iter_mut().enumerate() {
                    *o = head_out[j * rows + r] / s;
                }
            }
        }
    }
}

/// The online softmax of one unit's queries for one head: each query's running
/// maximum and sum, and the factor the output accumulated so far is rescaled by
/// when the maximum grows.
struct Online {
    max: Vec<f32>,
    sum: Vec<f32>,
    correction: Vec<f32>,
    /// Scratch: each query's maximum over the block, then its exponentials' sum
    /// in eight lanes (`lanes[l·rows + r]` for the keys `c ≡ l` mod 8).
    block_max: Vec<f32>,
    lanes: Vec<f32>,
    /// Whether a block has been added since [`Online::reset`].
    started: bool,
}

impl Online {
    fn new(rows: usize) -> Self {
        Online {
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            correction: vec![1.0; rows],
            block_max: vec![f32::NEG_INFINITY; rows],
            lanes: vec![0.0; 8 * rows],
            started: false,
        }
    }

    fn reset(&mut self) {
        self.max.fill(f32::NEG_INFINITY);
        self.sum.fill(0.0);
        self.correction.fill(1.0);
        self.started = false;
    }

    /// Takes one key block's scores (column by column, `max.len()` queries each)
    /// and replaces them with their exponentials shifted by each query's new
    /// maximum; updates the maxima and sums and, after the first block, sets
    /// [`Online::correction`] for the output accumulated so far.
    fn add_block(&mut self, scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                return unsafe { self.add_block_avx512(scores) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                return unsafe { self.add_block_avx2(scores) };
            }
        }
        self.add_block_portable(scores)
    }

    /// [`Online::add_block_portable`] compiled for AVX-512: sixteen queries at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn add_block_avx512(&mut self, scores: &mut [f32]) {
        self.add_block_portable(scores)
    }

    /// [`Online::add_block_portable`] compiled for AVX2: eight queries at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn add_block_avx2(&mut self, scores: &mut [f32]) {
        self.add_block_portable(scores)
    }

    /// The body of [`Online::add_block`]. Every operation is per query and in a
    /// fixed order (a query's sum adds its keys in eight lanes by key index, then
    /// the lanes pairwise), so every variant gives the same bits.
    #[inline(always)]
    fn add_block_portable(&mut self, scores: &mut [f32]) {
        let rows = self.max.len();
        self.block_max.copy_from_slice(&self.max);
        for column in scores.chunks_exact(rows) {
            for (m, s) in self.block_max.iter_mut().zip(column) {
                *m = m.max(*s);
            }
        }
        self.lanes.fill(0.0);
        for (c, column) in scores.chunks_exact_mut(rows).enumerate() {
            let lane = &mut self.lanes[(c % 8) * rows..][..rows];
            for ((s, m), l) in column.iter_mut().zip(&self.block_max).zip(lane) {
                *s = exp(*s - m);
                *l += *s;
            }
        }
        let lanes: [&[f32]; 8] = std::array::from_fn(|l| &self.lanes[l * rows..][..rows]);
        let queries = self.sum.iter_mut().zip(&mut self.correction);
        for (r, ((sum, correction), (max, new_max))) in queries
            .zip(self.max.iter().zip(&self.block_max))
            .enumerate()
        {
            let lane = |l: usize| lanes[l][r];
            let block_sum = ((lane(0) + lane(1)) + (lane(2) + lane(3)))
                + ((lane(4) + lane(5)) + (lane(6) + lane(7)));
            if self.started {
                *correction = (max - new_max).exp();
                *sum *= *correction;
            }
            *sum += block_sum;
        }
        self.max.copy_from_slice(&self.block_max);
        self.started = true;
    }
}

impl CustomOp3 for Attend {
    fn name(&self) -> &'static str {
        "kiln-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(self.name(), s1, l1)?;
        let k = contiguous_f32(self.name(), s2, l2)?;
        let v = contiguous_f32(self.name(), s3, l3)?;
        let (batch, queries, width) = l1.shape().dims3()?;
        let (_, keys, _) = l2.shape().dims3()?;
        let (_, _, v_width) = l3.shape().dims3()?;
        let mut out = vec![0f32; batch * queries * v_width];
        if queries > 0 && keys > 0 && v_width > 0 {
            out.par_chunks_mut(queries * v_width)
                .zip(q.par_chunks(queries * width))
                .zip(k.par_chunks(keys * width).zip(v.par_chunks(keys * v_width)))
                .for_each(|((out, q), (k, v))| {
                    // Column by column, so that `gemm` reads each value block in
                    // place instead of packing it for every unit.
                    let mut vt = vec![0f32; v.len()];
                    for (key, row) in v.chunks_exact(v_width).enumerate() {
                        for (c, value) in row.iter().enumerate() {
                            vt[c * keys + key] = *value;
                        }
                    }
                    let x = Operands {
                        q,
                        k,
                        vt: &vt,
                        width,
                        v_width,
                        keys,
                    };
                    out.par_chunks_mut(QUERY_BLOCK * v_width)
                        .enumerate()
                        .for_each(|(i, out)| self.unit(&x, i * QUERY_BLOCK, out));
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((batch, queries, v_width))))
    }
}

/// `e^x` for f32 (Cephes' `expf`: a degree-6 polynomial after reduction by
/// ln 2; within 2 ulp), branch-free so that loops over it vectorise; 0 below
/// −87.3 (`exp` of −∞ included), +∞ is not produced (clamped at 88.3).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let below = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let rounded = x * LOG2E + ROUND;
    let n = rounded - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    let pow2 = two_to_the(rounded);
    if below { 0.0 } else { y * pow2 }
}

/// 1.5 · 2²³: adding it to a float of magnitude below 2²² rounds that to the
/// nearest integer n, and the sum's bits are ROUND's plus n.
const ROUND: f32 = 12_582_912.0;

/// 2ⁿ for `rounded` = [`ROUND`] + n, −126 ≤ n ≤ 127: the exponent field comes
/// from the sum's bits, in integer lanes. (`n as i32` would be a saturating
/// conversion, which the compiler leaves scalar: one lane at a time, and most of
/// the exponential's cost.)
#[inline(always)]
fn two_to_the(rounded: f32) -> f32 {
    f32::from_bits(
        rounded
            .to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            << 23,
    )
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// The plain formula: heads into the batch, full scores, softmax, product.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let split = |t: &Tensor| {
            let (b, n, w) = t.dims3().unwrap();
            t.reshape((b, n, heads, w / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let scores = (split(q).matmul(&split(k).t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let out = probs.matmul(&split(v)).unwrap().transpose(1, 2).unwrap();
        let (b, n, _, _) = out.dims4().unwrap();
        out.reshape((b, n, ())).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_the_plain_formula() -> candle_core::Result<()> {
        let cpu = &Device::Cpu;
        // Queries and keys that do not fill their blocks, several key blocks, one head
        // and several, values narrower than the keys, cross-attention's 77 keys.
        for (batch, queries, keys, heads, d, dv) in [
            (2, 130, 77, 4, 8, 8),
            (1, 64, 1100, 2, 5, 3),
            (2, 3, 513, 1, 16, 16),
            (1, 200, 200, 8, 4, 4),
        ] {
            let q = Tensor::randn(0f32, 3., (batch, queries, heads * d), cpu)?;
            let k = Tensor::randn(0f32, 3., (batch, keys, heads * d), cpu)?;
            let v = Tensor::randn(0f32, 1., (batch, keys, heads * dv), cpu)?;
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention(&q, &k, &v, heads, scale)?;
            let want = reference(&q, &k, &v, heads, scale);
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want);
            assert!(
                diff < 1e-5,
                "{batch}x{queries}x{keys}, {heads} heads: {diff}"
            );
            // Each batch row alone gives its rows of the batch, bit for bit.
            let values = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
            for b in 0..batch {
                let r = b..b + 1;
                let alone = attention(
                    &q.i(r.clone())?,
                    &k.i(r.clone())?,
                    &v.i(r.clone())?,
                    heads,
                    scale,
                )?;
                assert!(values(alone)? == values(got.i(r)?)?);
            }
        }
        Ok(())
    }

    #[test]
    fn exp_is_within_float_rounding() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let relative = ((got - want) / want).abs();
            assert!(relative < 2.5e-7, "exp({x}) = {got}, want {want}");
            x += 0.013;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn powers_of_two_come_from_the_rounded_bits() {
        for n in -126..=127 {
            assert_eq!(two_to_the(n as f32 + ROUND), 2f32.powi(n), "2^{n}");
        }
    }

    /// Scores of `rows` queries over `cols` keys, column by column.
    fn columns(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i * 37 + seed) % 101) as f32) * -0.37 + (i % 7) as f32)
            .collect()
    }

    /// Every compiled variant of the online softmax gives the bits of the portable
    /// one (the determinism class does not name them).
    #[test]
    fn online_softmax_variants_give_the_same_bits() {
        for (rows, cols) in [
            (1, 1),
            (7, 9),
            (16, 8),
            (17, 77),
            (64, 512),
            (3, 1031),
            (128, 512),
            (35, 17),
        ] {
            let blocks = [columns(rows, cols, 1), columns(rows, cols, 2)];
            let run = |add: &dyn Fn(&mut Online, &mut [f32])| {
                let mut state = Online::new(rows);
                let mut seen = Vec::new();
                for block in &blocks {
                    let mut scores = block.clone();
                    add(&mut state, &mut scores);
                    seen.extend(scores);
                    seen.extend(&state.correction);
                }
                seen.extend(&state.sum);
                seen.extend(&state.max);
                seen.into_iter().map(f32::to_bits).collect::<Vec<_>>()
            };
            let want = run(&|s, x| s.add_block_portable(x));
            assert_eq!(run(&|s, x| s.add_block(x)), want, "{rows}x{cols}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked just above).
                let avx2 = run(&|s, x| unsafe { s.add_block_avx2(x) });
                assert_eq!(avx2, want, "AVX2 {rows}x{cols}");
            }
        }
    }

    /// Two blocks through the online softmax give each query the maximum, the sum
    /// and the probabilities (up to the correction) of one pass over all its keys.
    #[test]
    fn online_softmax_matches_one_pass() {
        let (rows, cols) = (5, 37);
        let blocks = [columns(rows, cols, 3), columns(rows, cols, 4)];
        let mut state = Online::new(rows);
        let mut first = blocks[0].clone();
        state.add_block(&mut first);
        let mut second = blocks[1].clone();
        state.add_block(&mut second);
        for r in 0..rows {
            let all: Vec<f64> = blocks
                .iter()
                .flat_map(|b| b.chunks_exact(rows).map(move |c| c[r] as f64))
                .collect();
            let max = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = all.iter().map(|x| (x - max).exp()).sum();
            assert_eq!(state.max[r] as f64, max, "query {r}");
            assert!(
                ((state.sum[r] as f64 - sum) / sum).abs() < 1e-6,
                "query {r}"
            );
            // The first block's exponentials were shifted by the maximum of that
            // block; the correction brings them to the overall maximum. (An f32
            // argument of magnitude a carries a relative error of about a·2⁻²⁴ into
            // its exponential: up to 40 here.)
            let third = (blocks[0][3 * rows + r] as f64 - max).exp();
            let got = first[3 * rows + r] as f64 * state.correction[r] as f64;
            assert!((got - third).abs() < 1e-5 * third, "{got} vs {third}");
            let last = (blocks[1][(cols - 1) * rows + r] as f64 - max).exp();
            let got = second[(cols - 1) * rows + r] as f64;
            assert!((got - last).abs() < 1e-5 * last, "{got} vs {last}");
        }
    }
}
