//! kiln's 2-D convolution: on the CPU, weights laid out once and an NCHW im2col
//! feeding one matrix product per band of output rows, or, for 3×3 stride-1
//! convolutions on large planes, a Winograd form ([`crate::winograd`]).
//!
//! Convolutions are the largest share of a UNet step on the CPU (half of an
//! SD-1.5 step at 256 px, most of a VAE decode; `kiln bench pipeline
//! --profile`). candle 0.11's CPU convolution redoes work on every call: it
//! copies the input to NHWC and reshuffles the weight to `[c_out, kh·kw·c_in]`
//! on one thread, builds im2col tiles of 512 pixels with a scattered
//! per-element loop, runs a small matrix product per tile, and scatters the
//! result back to NCHW. [`Conv2d`] instead packs the weight once at load, as
//! `[c_out, c_in·kh·kw + 1]` with the bias as the last column; per call it
//! builds the im2col matrix of each image straight from NCHW (for stride 1 each
//! row is a shifted copy of an input row, so the loops are `memcpy`s, run in
//! parallel over channels) in one scratch buffer reused across bands and
//! images, appends a row of ones for the bias, and lets one matrix product
//! (`gemm`, as candle calls it) per band write the output in NCHW order, in
//! place. Nothing is copied back, and the bias costs no extra pass.
//! [`Conv2d::forward_upsampled`] reads its input as the 2× nearest-neighbour
//! upsampling diffusers' `Upsample2D` makes, without making it. 1×1
//! convolutions are a plain matrix product on the input.
//!
//! The result is the same convolution with the products summed in a different
//! order, so outputs differ from candle's in the last bits (about 1e-6
//! relative); like candle's, they do not depend on the thread count. Devices
//! other than the CPU, and dtypes other than f32, use candle's convolution.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use crate::operand::contiguous_f32;
use crate::product::{Dst, Src};
use crate::winograd;

/// Bytes of one image's im2col matrix above which the output is computed in bands
/// of rows: 16 MiB. glibc serves allocations below its largest mmap threshold
/// (32 MiB) from the heap, which reuses freed memory; larger ones are fresh
/// mappings that page-fault and are zeroed by the kernel on first touch. Bands
/// also bound memory: a 512 px VAE's last 3×3 convolutions would need 2.4 GB
/// matrices unbanded. The band height depends only on the shapes, so results do
/// not depend on the thread count or the batch.
const BAND_BYTES: usize = 16 << 20;

/// Rows of the output that `gemm`'s widest f32 microkernel computes at once
/// (four AVX-512 vectors). A product whose row count leaves a remainder runs the
/// remainder through narrower kernels, which load more per multiplication.
const KERNEL_ROWS: usize = 64;

/// Rows per band when a band of `row_bytes` a row may take `budget` bytes: at
/// least one, at most `total`. When the budget is short of the whole, the count
/// is rounded down, where that leaves at least one multiple, so that the band's
/// `row_width`·rows columns fill whole [`KERNEL_ROWS`] panels of the band's
/// product. Results do not depend on the band (each output is summed over the
/// same inputs in the same order), only the speed does.
pub(crate) fn band_rows(budget: usize, row_bytes: usize, row_width: usize, total: usize) -> usize {
    let band = (budget / row_bytes.max(1)).clamp(1, total);
    if band == total {
        return band;
    }
    let step = KERNEL_ROWS / gcd(row_width.max(1), KERNEL_ROWS);
    if band >= step {
        band / step * step
    } else {
        band
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A 2-D convolution (groups 1, dilation 1) with diffusers' `weight`/`bias` names.
#[derive(Debug)]
pub(crate) struct Conv2d {
    /// The weights, as the forward pass uses them.
    weights: Weights,
    /// Kernel side.
    kernel: usize,
    /// Stride and padding (the same along both axes).
    stride: usize,
    padding: usize,
    /// Largest im2col matrix per image, in bytes; taller outputs are computed in bands.
    band_bytes: usize,
    /// Which Winograd form 3×3 convolutions use (by shape; tests force one).
    winograd: winograd::Choice,
    /// `conv2d`, as candle's traced convolution names its span.
    span: tracing::Span,
}

/// A convolution's weights: packed for the CPU path, or candle's module elsewhere.
///
/// Only one form is kept: holding both would double the memory of every
/// convolution (about 2 GB for an SD-1.5 UNet).
#[derive(Debug)]
enum Weights {
    /// CPU, f32, k×k: `[c_out, c_in·k·k + 1]`, the weight rows then the bias, contiguous.
    Im2Col(Tensor),
    /// CPU, f32, 1×1, stride 1, no padding: `[c_out, c_in]` and the bias as `[1, c_out, 1]`.
    Pointwise(Tensor, Option<Tensor>),
    /// Any other device or dtype: candle's convolution.
    Candle(candle_nn::Conv2d),
}

/// Loads a `kernel`×`kernel` convolution from `vb` (`weight`, `bias`).
pub(crate) fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    Conv2d::from_candle(candle_nn::conv2d(
        in_channels,
        out_channels,
        kernel,
        cfg,
        vb,
    )?)
}

impl Conv2d {
    /// Wraps candle's module: packs its weight when it lives on the CPU in f32 (and
    /// drops candle's copy), else keeps the module for candle's convolution.
    fn from_candle(inner: candle_nn::Conv2d) -> candle_core::Result<Self> {
        let cfg = *inner.config();
        if cfg.groups != 1 || cfg.dilation != 1 {
            return Err(candle_core::Error::Msg(
                "kiln's conv2d supports groups = 1 and dilation = 1 only".into(),
            ));
        }
        let weight = inner.weight();
        let (c_out, c_in, kernel, kernel_w) = weight.dims4()?;
        if kernel != kernel_w {
            return Err(candle_core::Error::Msg(format!(
                "kiln's conv2d needs a square kernel, got {kernel}x{kernel_w}"
            )));
        }
        let weights = if !weight.device().is_cpu() || weight.dtype() != DType::F32 {
            Weights::Candle(inner)
        } else if kernel == 1 && cfg.stride == 1 && cfg.padding == 0 {
            let rows = weight.reshape((c_out, c_in))?.contiguous()?;
            let bias = inner.bias().map(|b| b.reshape((1, (), 1))).transpose()?;
            Weights::Pointwise(rows, bias)
        } else {
            let rows = weight.reshape((c_out, c_in * kernel * kernel))?;
            let bias = match inner.bias() {
                Some(b) => b.reshape((c_out, 1))?,
                None => Tensor::zeros((c_out, 1), DType::F32, weight.device())?,
            };
            Weights::Im2Col(Tensor::cat(&[&rows, &bias], 1)?.contiguous()?)
        };
        Ok(Conv2d {
            weights,
            kernel,
            stride: cfg.stride,
            padding: cfg.padding,
            band_bytes: BAND_BYTES,
            winograd: winograd::Choice::ByShape,
            span: tracing::trace_span!("conv2d"),
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        let (batch, channels, height, width) = xs.dims4()?;
        match &self.weights {
            Weights::Candle(conv) => conv.forward(xs),
            Weights::Pointwise(rows, bias) => {
                let flat = xs.reshape((batch, channels, height * width))?;
                let out = rows.broadcast_left(batch)?.matmul(&flat)?;
                let out = match bias {
                    Some(bias) => out.broadcast_add(bias)?,
                    None => out,
                };
                out.reshape((batch, (), height, width))
            }
            Weights::Im2Col(packed) => self.im2col(xs, packed, false),
        }
    }
}

impl Conv2d {
    /// Runs the convolution on `xs` upsampled 2× by nearest neighbour (diffusers'
    /// `Upsample2D` then its convolution) without making the upsampled tensor: on the
    /// CPU path the im2col reads each input pixel twice along each axis. The same
    /// values as `forward(&xs.upsample_nearest2d(2h, 2w))`, bit for bit.
    pub(crate) fn forward_upsampled(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _entered = self.span.enter();
        match &self.weights {
            Weights::Im2Col(packed) => self.im2col(xs, packed, true),
            _ => {
                let (_, _, h, w) = xs.dims4()?;
                self.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
        }
    }

    /// The CPU path of a k×k convolution: one [`ConvOp`] over the whole batch.
    fn im2col(&self, xs: &Tensor, packed: &Tensor, upsample: bool) -> candle_core::Result<Tensor> {
        let op = ConvOp {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
            band_bytes: self.band_bytes,
            winograd: self.winograd,
            upsample,
        };
        xs.contiguous()?.apply_op2_no_bwd(packed, &op)
    }
}

/// A k×k convolution on the CPU: per image and band of output rows, the im2col
/// matrix ([`Im2Col`]) is built in one scratch buffer reused across bands and images,
/// and one matrix product (rayon-parallel `gemm`, whose sums do not depend on the
/// thread count) writes the band straight into the NCHW output. Where the whole
/// batch's im2col fits in one band (a UNet's deepest levels), one product covers
/// every image, so the weights are read once per batch instead of once per image.
struct ConvOp {
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Largest im2col matrix, in bytes; taller outputs are computed in bands.
    band_bytes: usize,
    /// Which Winograd form 3×3 convolutions use.
    winograd: winograd::Choice,
    /// Whether the input is read as its 2× nearest-neighbour upsampling.
    upsample: bool,
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), s1, l1)?;
        let weights = contiguous_f32(self.name(), s2, l2)?;
        let (batch, channels, h, w) = l1.shape().dims4()?;
        let (c_out, rows) = l2.shape().dims2()?;
        let k = self.kernel;
        if rows != channels * k * k + 1 {
            return Err(candle_core::Error::Msg(format!(
                "kiln-conv2d: weights {:?} do not fit {channels} input channels",
                l2.shape().dims()
            )));
        }
        let (vh, vw) = match self.upsample {
            true => (2 * h, 2 * w),
            false => (h, w),
        };
        let side = |n: usize| {
            (n + 2 * self.padding)
                .checked_sub(k)
                .filter(|_| self.stride > 0)
                .map(|span| span / self.stride + 1)
        };
        let (Some(out_h), Some(out_w)) = (side(vh), side(vw)) else {
            return Err(candle_core::Error::Msg(format!(
                "conv2d: a {vh}x{vw} input is smaller than the {k}x{k} kernel"
            )));
        };
        let plane = out_h * out_w;
        let mut out = vec![0f32; batch * c_out * plane];
        if plane == 0 || c_out == 0 {
            return Ok((
                CpuStorage::F32(out),
                Shape::from((batch, c_out, out_h, out_w)),
            ));
        }
        let shape = (k, self.stride, self.padding);
        if let Some(form) = winograd::form(self.winograd, shape, (out_h, out_w)) {
            let op = winograd::Winograd {
                form,
                packed: weights,
                c_in: channels,
                c_out,
                h,
                w,
                upsample: self.upsample,
                band_bytes: self.band_bytes,
            };
            op.run(input, &mut out);
            return Ok((
                CpuStorage::F32(out),
                Shape::from((batch, c_out, out_h, out_w)),
            ));
        }
        // Output rows per band: the band's im2col matrix stays under band_bytes.
        let per_row = rows * out_w * std::mem::size_of::<f32>();
        let band = band_rows(self.band_bytes, per_row, out_w, out_h);
        let threads = rayon::current_num_threads();
        let im2col = |out_rows: std::ops::Range<usize>| Im2Col {
            kernel: k,
            stride: self.stride,
            padding: self.padding,
            out_rows,
            upsample: self.upsample,
        };
        let images = input.chunks_exact(channels * h * w);
        // Small planes (the deep levels of a UNet): the whole batch in one product, so
        // that the weights, far larger than the images there, are read once rather
        // than once per image. With more than KERNEL_ROWS output channels neither
        // product takes gemm's path for small products (which splits the sum over
        // `rows` differently), so every output keeps its bits.
        let batch_bytes = batch * rows * plane * std::mem::size_of::<f32>();
        // (Within the budget, one image's im2col is too, so `band` is the whole plane.)
        if batch > 1 && c_out > KERNEL_ROWS && batch_bytes <= self.band_bytes {
            let pixels = batch * plane;
            let mut scratch = vec![0f32; rows * plane];
            let mut columns = vec![0f32; rows * pixels];
            for (b, image) in images.enumerate() {
                im2col(0..out_h).fill(image, (channels, h, w), &mut scratch, out_w);
                for (all, one) in columns
                    .chunks_exact_mut(pixels)
                    .zip(scratch.chunks_exact(plane))
                {
                    all[b * plane..][..plane].copy_from_slice(one);
                }
            }
            let mut products = vec![0f32; c_out * pixels];
            product(
                &mut products,
                pixels,
                weights,
                &columns,
                (c_out, pixels, rows),
                threads,
            );
            for (b, output) in out.chunks_exact_mut(c_out * plane).enumerate() {
                for (o, channel) in output.chunks_exact_mut(plane).enumerate() {
                    channel.copy_from_slice(&products[o * pixels + b * plane..][..plane]);
                }
            }
            return Ok((
                CpuStorage::F32(out),
                Shape::from((batch, c_out, out_h, out_w)),
            ));
        }
        let mut scratch = vec![0f32; rows * band * out_w];
        for (image, output) in images.zip(out.chunks_exact_mut(c_out * plane)) {
            for first in (0..out_h).step_by(band) {
                let op = im2col(first..(first + band).min(out_h));
                let pixels = op.out_rows.len() * out_w;
                let columns = &mut scratch[..rows * pixels];
                op.fill(image, (channels, h, w), columns, out_w);
                // output[:, band] = weights · columns
                product(
                    &mut output[first * out_w..],
                    plane,
                    weights,
                    columns,
                    (c_out, pixels, rows),
                    threads,
                );
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, c_out, out_h, out_w)),
        ))
    }
}

/// `dst (c_out × pixels, row stride dst_rs) = weights (c_out × rows) · columns
/// (rows × pixels)`, all row-major, on `threads` rayon threads.
fn product(
    dst: &mut [f32],
    dst_rs: usize,
    weights: &[f32],
    columns: &[f32],
    (c_out, pixels, rows): (usize, usize, usize),
    threads: usize,
) {
    let operand = |data, rs| Src { data, rs, cs: 1 };
    crate::product::product(
        Dst {
            data: dst,
            rs: dst_rs,
            cs: 1,
            accumulate: false,
        },
        (c_out, pixels, rows),
        operand(weights, rows),
        operand(columns, pixels),
        1.0,
        gemm::Parallelism::Rayon(threads),
    );
}

/// One image's im2col matrix for a band of output rows, `[c·k·k + 1, rows·out_w]`:
/// row `(ci·k + kh)·k + kw` holds input channel `ci` shifted by `(kh, kw)` (zeros
/// where that falls in the padding); the last row is ones, for the bias.
struct Im2Col {
    kernel: usize,
    stride: usize,
    padding: usize,
    /// The output rows of the band.
    out_rows: std::ops::Range<usize>,
    /// Whether the input is read as its 2× nearest-neighbour upsampling.
    upsample: bool,
}

impl Im2Col {
    /// Fills `columns` from the NCHW `image` (`channels`×`h`×`w`), in parallel over
    /// channels.
    fn fill(
        &self,
        image: &[f32],
        (channels, h, w): (usize, usize, usize),
        columns: &mut [f32],
        out_w: usize,
    ) {
        let k = self.kernel;
        let pixels = self.out_rows.len() * out_w;
        let (body, ones) = columns.split_at_mut(channels * k * k * pixels);
        ones.fill(1.0);
        body.par_chunks_mut(k * k * pixels)
            .zip(image.par_chunks(h * w))
            .for_each(|(block, plane)| self.channel(plane, (h, w), block, out_w));
    }

    /// Fills the `k·k` rows of one input channel (`plane`, `h`×`w`) into `block`.
    fn channel(&self, plane: &[f32], (h, w): (usize, usize), block: &mut [f32], out_w: usize) {
        let out_h = self.out_rows.len();
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        // The size of the plane as the convolution sees it.
        let (vh, vw) = match self.upsample {
            true => (2 * h, 2 * w),
            false => (h, w),
        };
        for (offset, row) in block.chunks_exact_mut(out_h * out_w).enumerate() {
            let (kh, kw) = (offset / k, offset % k);
            // Output columns whose input column `ox·s + kw − p` lies in [0, vw).
            let first = p.saturating_sub(kw).div_ceil(s);
            let end = if vw + p > kw {
                (vw + p - kw).div_ceil(s).min(out_w)
            } else {
                0
            };
            for (oy, dst) in self.out_rows.clone().zip(row.chunks_exact_mut(out_w)) {
                let iy = oy * s + kh;
                if iy < p || iy - p >= vh || first >= end {
                    // Padding: zeros (the scratch is reused, so write them).
                    dst.fill(0.0);
                    continue;
                }
                dst[..first].fill(0.0);
                dst[end..].fill(0.0);
                let ix0 = first * s + kw - p;
                let dst = &mut dst[first..end];
                if self.upsample {
                    let src = &plane[((iy - p) / 2) * w..][..w];
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = src[(ix0 + j * s) / 2];
                    }
                } else {
                    let src = &plane[(iy - p) * w..][..w];
                    if s == 1 {
                        dst.copy_from_slice(&src[ix0..ix0 + dst.len()]);
                    } else {
                        for (d, x) in dst.iter_mut().zip(src[ix0..].iter().step_by(s)) {
                            *d = *x;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bands_fill_whole_kernel_panels() {
        use super::band_rows;
        // 10 rows of 16 fit: 8 make 128 columns, two panels.
        assert_eq!(band_rows(10 * 100, 100, 16, 64), 8);
        // Rows of 48 columns: four rows make three panels.
        assert_eq!(band_rows(7 * 100, 100, 48, 64), 4);
        // Fewer rows fit than one multiple needs: as many as fit.
        assert_eq!(band_rows(3 * 100, 100, 16, 64), 3);
        // Everything fits: the whole, unrounded; nothing fits: one row.
        assert_eq!(band_rows(1 << 20, 100, 16, 13), 13);
        assert_eq!(band_rows(1, 100, 16, 13), 1);
        // Rows of 64 columns or a multiple fill panels alone.
        assert_eq!(band_rows(7 * 100, 100, 128, 64), 7);
    }

    use std::collections::HashMap;

    use candle_core::{Device, IndexOp};

    use super::*;

    /// Checks kiln's convolution against candle's for one configuration.
    fn check(
        (c_in, c_out): (usize, usize),
        (kernel, stride, padding): (usize, usize, usize),
        (h, w): (usize, usize),
        bias: bool,
    ) -> candle_core::Result<()> {
        let cpu = &Device::Cpu;
        let mut tensors = HashMap::new();
        tensors.insert(
            "weight".to_string(),
            Tensor::randn(0f32, 0.2, (c_out, c_in, kernel, kernel), cpu)?,
        );
        if bias {
            tensors.insert("bias".to_string(), Tensor::randn(0f32, 1., c_out, cpu)?);
        }
        let cfg = Conv2dConfig {
            stride,
            padding,
            ..Default::default()
        };
        let reference_conv =
            candle_nn::Conv2d::new(tensors["weight"].clone(), tensors.get("bias").cloned(), cfg);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, cpu);
        let mut conv = if bias {
            conv2d(c_in, c_out, kernel, cfg, vb)?
        } else {
            Conv2d::from_candle(candle_nn::conv2d_no_bias(c_in, c_out, kernel, cfg, vb)?)?
        };
        let xs = Tensor::randn(0f32, 1., (2, c_in, h, w), cpu)?;
        let reference = reference_conv.forward(&xs)?;
        // As the shape decides, then with each Winograd form wherever it applies.
        for choice in [
            winograd::Choice::ByShape,
            winograd::Choice::Always(&winograd::F2),
            winograd::Choice::Always(&winograd::F4),
        ] {
            conv.winograd = choice;
            check_against(
                &mut conv,
                &xs,
                &reference,
                (c_in, c_out, kernel, stride, padding),
            )?;
        }
        Ok(())
    }

    /// Checks `conv` on `xs` against candle's `reference`, in bands, on strided
    /// views, per image, and with the upsampling fused.
    fn check_against(
        conv: &mut Conv2d,
        xs: &Tensor,
        reference: &Tensor,
        (c_in, c_out, kernel, stride, padding): (usize, usize, usize, usize, usize),
    ) -> candle_core::Result<()> {
        let (_, _, h, w) = xs.dims4()?;
        let got = conv.forward(xs)?;
        assert_eq!(got.dims(), reference.dims());
        let diff = (&got - reference)?.abs()?.flatten_all()?.max(0)?;
        let scale = reference.abs()?.flatten_all()?.max(0)?;
        let relative = (diff.to_scalar::<f32>()? / scale.to_scalar::<f32>()?.max(1e-12)) as f64;
        let what = format!(
            "{c_in}->{c_out} k{kernel} s{stride} p{padding} {h}x{w}, Winograd {:?}",
            conv.winograd
        );
        assert!(relative < 1e-5, "{what}: relative difference {relative}");
        // Computed one output row at a time, the output is as close.
        conv.band_bytes = 1;
        let banded = conv.forward(xs)?;
        let diff = (&banded - reference)?.abs()?.flatten_all()?.max(0)?;
        let relative = (diff.to_scalar::<f32>()? / scale.to_scalar::<f32>()?.max(1e-12)) as f64;
        assert!(
            relative < 1e-5,
            "{what} in bands: relative difference {relative}"
        );
        conv.band_bytes = BAND_BYTES;
        // A strided view of the same values gives the same bytes.
        let view = xs.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        let values = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        assert!(
            values(conv.forward(&view)?)? == values(got.clone())?,
            "{what}"
        );
        // The second image alone gives the second image's output.
        let one = conv.forward(&xs.i(1..2)?)?;
        assert!(values(one)? == values(got.i(1..2)?)?, "{what}");
        // Upsampling fused into the im2col gives the bytes of upsampling first, in
        // one band or many.
        let up = xs.upsample_nearest2d(2 * h, 2 * w)?;
        for band_bytes in [BAND_BYTES, 1] {
            conv.band_bytes = band_bytes;
            assert!(
                values(conv.forward_upsampled(xs)?)? == values(conv.forward(&up)?)?,
                "{what} upsampled, bands of {band_bytes} bytes"
            );
        }
        conv.band_bytes = BAND_BYTES;
        Ok(())
    }

    /// A UNet's 16×16 latent level takes F(2×2, 3×3), its 8×8 one stays on im2col;
    /// F(4×4, 3×3) from 32×32; only 3×3, stride 1, padding 1 qualifies.
    #[test]
    fn the_shape_picks_the_form() {
        let by_shape = |shape, out| {
            winograd::form(winograd::Choice::ByShape, shape, out).map(|f| format!("{f:?}"))
        };
        let f2 = Some("F(2x2, 3x3)".to_string());
        let f4 = Some("F(4x4, 3x3)".to_string());
        assert_eq!(by_shape((3, 1, 1), (8, 8)), None);
        assert_eq!(by_shape((3, 1, 1), (14, 16)), None);
        assert_eq!(by_shape((3, 1, 1), (16, 16)), f2);
        assert_eq!(by_shape((3, 1, 1), (28, 32)), f2);
        assert_eq!(by_shape((3, 1, 1), (32, 32)), f4);
        assert_eq!(by_shape((3, 1, 1), (64, 64)), f4);
        assert_eq!(by_shape((3, 2, 1), (64, 64)), None);
        assert_eq!(by_shape((1, 1, 0), (64, 64)), None);
    }

    #[test]
    fn matches_candles_convolution() -> candle_core::Result<()> {
        check((4, 8), (3, 1, 1), (9, 7), true)?;
        check((8, 8), (3, 2, 1), (9, 7), true)?;
        check((8, 8), (3, 2, 0), (8, 8), true)?;
        check((6, 5), (1, 1, 0), (5, 3), true)?;
        check((6, 5), (1, 1, 0), (5, 3), false)?;
        check((6, 5), (3, 1, 1), (1, 1), false)?;
        check((3, 4), (3, 1, 0), (5, 6), true)?;
        // Enough 2×2 tiles (9×8) but too few 4×4 ones for F(2×2, 3×3) as the shape
        // decides.
        check((5, 3), (3, 1, 1), (17, 15), true)?;
        // Enough 4×4 tiles (9×8, 17×16) for F(4×4, 3×3) as the shape decides.
        check((5, 3), (3, 1, 1), (33, 31), true)?;
        check((3, 2), (3, 1, 1), (67, 61), true)?;
        // Many input channels: the transforms' rounding summed over them.
        check((64, 4), (3, 1, 1), (12, 10), false)?;
        check((2, 6), (3, 1, 1), (2, 3), false)?;
        // More output channels than gemm's small products take, on planes small
        // enough for one product over the batch; the second with more rows (577)
        // than gemm sums in one pass.
        check((8, 80), (3, 1, 1), (5, 4), true)?;
        check((64, 72), (3, 2, 1), (8, 8), false)?;
        Ok(())
    }
}
