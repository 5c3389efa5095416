//! The one call of `gemm`'s f32 matrix product in kiln's CPU kernels, bounds
//! checked: [`product`] takes each operand as a slice with its strides, asserts
//! that every element the shape addresses lies inside it, and only then makes
//! the unsafe call. [`crate::attend`], [`crate::conv`] and [`crate::winograd`]
//! all go through it.
//!
//! `gemm` sums each output over `k` in an order that depends only on `k` and on
//! whether the product is small (at most 64×64 outputs): not on the thread count,
//! the strides or where the output sits in a larger product, which is what lets
//! those kernels split work into blocks without changing a bit.

/// A matrix operand: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Src<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

/// The output matrix: element `(i, j)` at `data[i·rs + j·cs]`, added to when
/// `accumulate`, else overwritten.
pub(crate) struct Dst<'a> {
    pub data: &'a mut [f32],
    pub rs: usize,
    pub cs: usize,
    pub accumulate: bool,
}

/// `dst (+)= scale · lhs · rhs` for `(m, n, k)`: `lhs` m×k, `rhs` k×n, on this
/// thread (`gemm::Parallelism::None`) or on rayon.
///
/// # Panics
///
/// When an operand's slice is too short for its shape and strides: a bug in the
/// caller, checked here so that the unsafe call below never reads or writes out
/// of bounds.
pub(crate) fn product(
    dst: Dst,
    (m, n, k): (usize, usize, usize),
    lhs: Src,
    rhs: Src,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst.rs, dst.cs) < dst.data.len(),
        "matrix product: output"
    );
    if k > 0 {
        assert!(
            last(m, k, lhs.rs, lhs.cs) < lhs.data.len(),
            "matrix product: lhs"
        );
        assert!(
            last(k, n, rhs.rs, rhs.cs) < rhs.data.len(),
            "matrix product: rhs"
        );
    }
    // SAFETY: the asserts above keep every element gemm addresses (row·rs + column·cs
    // within the given shape) inside its slice; `dst` is borrowed mutably and so
    // aliases neither `lhs` nor `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
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
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop, in f64.
    fn reference((m, n, k): (usize, usize, usize), lhs: &Src, rhs: &Src, scale: f32) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| {
                        lhs.data[i * lhs.rs + p * lhs.cs] as f64
                            * rhs.data[p * rhs.rs + j * rhs.cs] as f64
                    })
                    .sum::<f64>()
                    * scale as f64;
            }
        }
        out
    }

    #[test]
    fn strided_operands_give_the_plain_product() {
        let (m, n, k) = (5, 7, 9);
        let values: Vec<f32> = (0..200)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        // lhs row-major, rhs column-major, output column-major then row-major.
        let lhs = Src {
            data: &values,
            rs: k,
            cs: 1,
        };
        let rhs = Src {
            data: &values[50..],
            rs: 1,
            cs: k,
        };
        let want = reference((m, n, k), &lhs, &rhs, 0.5);
        for (rs, cs) in [(1, m), (n, 1)] {
            for parallelism in [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)] {
                let run = |out: &mut [f32], accumulate| {
                    let dst = Dst {
                        data: out,
                        rs,
                        cs,
                        accumulate,
                    };
                    product(dst, (m, n, k), lhs, rhs, 0.5, parallelism);
                };
                let check = |out: &[f32], times: f64| {
                    for i in 0..m {
                        for j in 0..n {
                            let got = out[i * rs + j * cs] as f64;
                            let want = times * want[i * n + j];
                            assert!((got - want).abs() < 1e-5, "{times} × ({i}, {j})");
                        }
                    }
                };
                let mut out = vec![1f32; m * n];
                run(&mut out, false);
                check(&out, 1.0);
                // Accumulating adds the product to what is there.
                run(&mut out, true);
                check(&out, 2.0);
            }
        }
    }

    #[test]
    #[should_panic(expected = "matrix product: rhs")]
    fn a_short_operand_is_refused() {
        let data = [1f32; 8];
        let mut out = [0f32; 4];
        product(
            Dst {
                data: &mut out,
                rs: 2,
                cs: 1,
                accumulate: false,
            },
            (2, 2, 3),
            Src {
                data: &data,
                rs: 3,
                cs: 1,
            },
            Src {
                data: &data[..5],
                rs: 2,
                cs: 1,
            },
            1.0,
            gemm::Parallelism::None,
        );
    }
}
