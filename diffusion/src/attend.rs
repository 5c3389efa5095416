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
//! `gemm` kernels candle itself uses.
//!
//! Every number a query gets depends only on its own row, the keys and the
//! values, and the block sizes are constants: outputs do not depend on the
//! thread count or on the other rows of the batch. `exp` is a polynomial
//! (Cephes' `expf`, within 2 ulp) written so that the compiler vectorises it
//! and the sums run in eight fixed lanes, so the result is the same whatever
//! vector width runs it. Devices other than the CPU and dtypes other than f32
//! use candle's operations.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Queries per unit of work.
const QUERY_BLOCK: usize = 64;
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

/// One batch row's operands, row-major with `width`/`v_width` floats per token.
struct Operands<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    width: usize,
    v_width: usize,
    keys: usize,
}

impl Attend {
    /// Computes the queries `first..first + rows` of one batch row into `out`
    /// (`rows × v_width`).
    fn unit(&self, x: &Operands, first: usize, out: &mut [f32]) {
        let rows = out.len() / x.v_width;
        let (d, dv) = (x.width / self.heads, x.v_width / self.heads);
        let block = KEY_BLOCK.min(x.keys);
        let mut scores = vec![0f32; rows * block];
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        for h in 0..self.heads {
            max.fill(f32::NEG_INFINITY);
            sum.fill(0.0);
            for (step, start) in (0..x.keys).step_by(block).enumerate() {
                let cols = block.min(x.keys - start);
                let scores = &mut scores[..rows * cols];
                // scores = scale · q_block · k_blockᵀ
                product(
                    Dst {
                        data: scores,
                        rs: cols,
                        accumulate: false,
                    },
                    (rows, cols, d),
                    Src {
                        data: &x.q[first * x.width + h * d..],
                        rs: x.width,
                        cs: 1,
                    },
                    Src {
                        data: &x.k[start * x.width + h * d..],
                        rs: 1,
                        cs: x.width,
                    },
                    self.scale,
                );
                for (r, row) in scores.chunks_exact_mut(cols).enumerate() {
                    let block_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let new_max = max[r].max(block_max);
                    let block_sum = exp_shifted(row, new_max);
                    if step > 0 {
                        let correction = (max[r] - new_max).exp();
                        sum[r] *= correction;
                        for o in &mut out[r * x.v_width + h * dv..][..dv] {
                            *o *= correction;
                        }
                    }
                    sum[r] += block_sum;
                    max[r] = new_max;
                }
                // out_block (+)= probabilities · v_block
                product(
                    Dst {
                        data: &mut out[h * dv..],
                        rs: x.v_width,
                        accumulate: step > 0,
                    },
                    (rows, dv, cols),
                    Src {
                        data: scores,
                        rs: cols,
                        cs: 1,
                    },
                    Src {
                        data: &x.v[start * x.v_width + h * dv..],
                        rs: x.v_width,
                        cs: 1,
                    },
                    1.0,
                );
            }
            for (r, s) in sum.iter().enumerate() {
                for o in &mut out[r * x.v_width + h * dv..][..dv] {
                    *o /= s;
                }
            }
        }
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
        let slice =
            |s: &'_ CpuStorage, l: &Layout| -> candle_core::Result<std::ops::Range<usize>> {
                match (s, l.contiguous_offsets()) {
                    (CpuStorage::F32(_), Some((a, b))) => Ok(a..b),
                    _ => Err(candle_core::Error::Msg(
                        "kiln-attention: contiguous f32 operands expected".into(),
                    )),
                }
            };
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (s1, s2, s3) else {
            return Err(candle_core::Error::Msg(
                "kiln-attention: f32 operands expected".into(),
            ));
        };
        let (q, k, v) = (&q[slice(s1, l1)?], &k[slice(s2, l2)?], &v[slice(s3, l3)?]);
        let (batch, queries, width) = l1.shape().dims3()?;
        let (_, keys, _) = l2.shape().dims3()?;
        let (_, _, v_width) = l3.shape().dims3()?;
        let mut out = vec![0f32; batch * queries * v_width];
        if queries > 0 && keys > 0 && v_width > 0 {
            out.par_chunks_mut(queries * v_width)
                .zip(q.par_chunks(queries * width))
                .zip(k.par_chunks(keys * width).zip(v.par_chunks(keys * v_width)))
                .for_each(|((out, q), (k, v))| {
                    let x = Operands {
                        q,
                        k,
                        v,
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

/// A matrix operand: element `(i, j)` at `data[i·rs + j·cs]`.
struct Src<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// The output matrix: element `(i, j)` at `data[i·rs + j]`, added to or overwritten.
struct Dst<'a> {
    data: &'a mut [f32],
    rs: usize,
    accumulate: bool,
}

/// `dst (+)= scale · lhs · rhs` for `(m, n, k)`: `lhs` m×k, `rhs` k×n, on this thread.
///
/// # Panics
///
/// When an operand's slice is too short for its shape and strides: a bug in the caller,
/// checked here so that the unsafe call below never reads or writes out of bounds.
fn product(dst: Dst, (m, n, k): (usize, usize, usize), lhs: Src, rhs: Src, scale: f32) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst.rs, 1) < dst.data.len(), "attention: output");
    if k > 0 {
        assert!(
            last(m, k, lhs.rs, lhs.cs) < lhs.data.len(),
            "attention: lhs"
        );
        assert!(
            last(k, n, rhs.rs, rhs.cs) < rhs.data.len(),
            "attention: rhs"
        );
    }
    // SAFETY: the asserts above keep every element gemm addresses (row·rs + column·cs
    // within the given shape) inside its slice; `dst` is borrowed mutably and does not
    // alias `lhs` or `rhs` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            dst.accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Replaces each `x` of `row` with `exp(x − shift)` and returns their sum, added in
/// eight fixed lanes. The exponentials are elementwise and the sum's order is fixed,
/// so every variant below gives the same bits.
fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F (checked just above).
        return unsafe { exp_shifted_avx512(row, shift) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { exp_shifted_avx2(row, shift) };
    }
    exp_shifted_portable(row, shift)
}

/// [`exp_shifted_portable`] compiled for AVX-512: sixteen exponentials at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_shifted_avx512(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted_portable(row, shift)
}

/// [`exp_shifted_portable`] compiled for AVX2: eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn exp_shifted_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted_portable(row, shift)
}

/// The body of [`exp_shifted`]: the exponentials in one pass (as wide as the CPU
/// allows), then their sum in eight lanes.
#[inline(always)]
fn exp_shifted_portable(row: &mut [f32], shift: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp(*x - shift);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (x, lane) in chunk.iter().zip(lanes.iter_mut()) {
            *lane += *x;
        }
    }
    for (x, lane) in chunks.remainder().iter().zip(lanes.iter_mut()) {
        *lane += *x;
    }
    let [a, b, c, d, e, f, g, h] = lanes;
    ((a + b) + (c + d)) + ((e + f) + (g + h))
}

/// `e^x` for f32 (Cephes' `expf`: a degree-6 polynomial after reduction by
/// ln 2; within 2 ulp), branch-free so that loops over it vectorise; 0 below
/// −87.3 (`exp` of −∞ included), +∞ is not produced (clamped at 88.3).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if below { 0.0 } else { y * pow2 }
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

    /// Every compiled variant of the softmax's exponentials gives the bits of the
    /// portable one (the determinism class does not name them).
    #[test]
    fn exp_variants_give_the_same_bits() {
        for len in [1, 7, 8, 9, 16, 17, 77, 1024, 1031] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32) * -0.37).collect();
            let mut portable = row.clone();
            let want = exp_shifted_portable(&mut portable, 1.5);
            let mut dispatched = row.clone();
            let got = exp_shifted(&mut dispatched, 1.5);
            assert_eq!(got.to_bits(), want.to_bits(), "sum of {len}");
            assert!(
                dispatched
                    .iter()
                    .zip(&portable)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                let mut avx2 = row.clone();
                // SAFETY: the CPU supports AVX2 (checked just above).
                let sum = unsafe { exp_shifted_avx2(&mut avx2, 1.5) };
                assert_eq!(sum.to_bits(), want.to_bits(), "AVX2 sum of {len}");
                assert!(
                    avx2.iter()
                        .zip(&portable)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
            }
        }
    }

    #[test]
    fn shifted_sums_match_a_sequential_sum() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let want: f64 = row.iter().map(|&x| ((x - 4.0) as f64).exp()).sum();
        let got = exp_shifted(&mut row, 4.0) as f64;
        assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
        let third = ((0.37f64 * 3.0).sin() * 4.0 - 4.0).exp();
        assert!(
            (row[3] as f64 - third).abs() < 1e-6 * third,
            "{} vs {third}",
            row[3]
        );
    }
}
