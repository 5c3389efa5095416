//! Control-image preprocessors that need no model weights (canny, scribble,
//! lineart) and the fitting of a control image to the render size.
//!
//! Each preprocessor turns an RGB picture into the white-on-black map a
//! ControlNet of its kind was trained on, following the A1111 ControlNet
//! extension's weight-free annotators:
//!
//! - **canny**: OpenCV's `Canny` as the extension calls it (no blur first,
//!   3×3 Sobel, L1 gradient magnitude, non-maximum suppression over four
//!   directions with OpenCV's tie rule, hysteresis between `low` and `high`
//!   over 8-connected pixels) on the picture's luma.
//! - **scribble**: a sketch of dark lines on light paper, thresholded at half
//!   grey and inverted: dark pixels become white lines on black.
//! - **lineart**: the extension's `lineart_standard`: the picture minus its
//!   Gaussian blur (σ = 6), darkest channel, normalised by the median of the
//!   clearly-drawn pixels, so lines come out white on black.
//!
//! Pose and depth maps need model weights (OpenPose, MiDaS) and are not made
//! here: recipes pass ready-made maps with no `preprocess`.
//!
//! [`fit`] sizes a control image to the render as A1111's resize modes do
//! ("Crop and Resize", "Resize and Fill", "Just Resize"), with a Lanczos3
//! filter, as diffusers' image processor resizes.

use image::imageops::FilterType;
use image::{GrayImage, RgbImage};
use kiln_domain::extras::{Preprocessor, ResizeMode};

/// Canny's default thresholds (the A1111 extension's and `kiln preprocess canny`'s).
pub const CANNY_DEFAULT: (f32, f32) = (100.0, 200.0);

/// Runs `preprocessor` with its default settings.
pub fn run(preprocessor: Preprocessor, image: &RgbImage) -> RgbImage {
    match preprocessor {
        Preprocessor::Canny => canny(image, CANNY_DEFAULT.0, CANNY_DEFAULT.1),
        Preprocessor::Scribble => scribble(image),
        Preprocessor::Lineart => lineart(image),
    }
}

/// Returns the luma (ITU-R BT.601, as OpenCV's `COLOR_RGB2GRAY`) of each pixel.
fn luma(image: &RgbImage) -> Vec<f32> {
    image
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0;
            (0.299 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b)).round()
        })
        .collect()
}

/// Returns a grey map as an RGB image (each channel the grey value).
fn grey_to_rgb(width: u32, height: u32, grey: &[u8]) -> RgbImage {
    let grey = GrayImage::from_raw(width, height, grey.to_vec()).unwrap_or_default();
    image::DynamicImage::ImageLuma8(grey).to_rgb8()
}

/// Canny edges of `image`: white (255) edge pixels on black.
///
/// Gradient magnitudes are OpenCV's unnormalised 3×3 Sobel sums in L1 (a step
/// from black to white is 1020), compared with `low` and `high` as they are.
pub fn canny(image: &RgbImage, low: f32, high: f32) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let grey = luma(image);
    let at = |x: isize, y: isize| {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        grey[y * w + x]
    };
    let mut gx = vec![0f32; w * h];
    let mut gy = vec![0f32; w * h];
    let mut mag = vec![0f32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let dx = (at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2.0 * at(x - 1, y) + at(x - 1, y + 1));
            let dy = (at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2.0 * at(x, y - 1) + at(x + 1, y - 1));
            let i = y as usize * w + x as usize;
            gx[i] = dx;
            gy[i] = dy;
            mag[i] = dx.abs() + dy.abs();
        }
    }
    let m = |x: isize, y: isize| {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0.0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // Non-maximum suppression: OpenCV keeps a pixel that is greater than its
    // neighbour before it and at least its neighbour after it along the gradient.
    let tan22 = (22.5f32).to_radians().tan();
    let tan67 = (67.5f32).to_radians().tan();
    let mut state = vec![0u8; w * h]; // 0 none, 1 weak, 2 strong
    for y in 0..h as isize {
        for x in 0..w as isize {
            let i = y as usize * w + x as usize;
            let v = mag[i];
            if v <= low {
                continue;
            }
            let (ax, ay) = (gx[i].abs(), gy[i].abs());
            let peak = if ay <= ax * tan22 {
                v > m(x - 1, y) && v >= m(x + 1, y)
            } else if ay > ax * tan67 {
                v > m(x, y - 1) && v >= m(x, y + 1)
            } else {
                let s = if (gx[i] < 0.0) != (gy[i] < 0.0) {
                    -1
                } else {
                    1
                };
                v > m(x - s, y - 1) && v > m(x + s, y + 1)
            };
            if peak {
                state[i] = if v > high { 2 } else { 1 };
            }
        }
    }
    // Hysteresis: weak pixels 8-connected to a strong one become edges.
    let mut stack: Vec<usize> = (0..w * h).filter(|&i| state[i] == 2).collect();
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (nx, ny) = (x + dx, y + dy);
                if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if state[j] == 1 {
                    state[j] = 2;
                    stack.push(j);
                }
            }
        }
    }
    let out: Vec<u8> = state
        .iter()
        .map(|&s| if s == 2 { 255 } else { 0 })
        .collect();
    grey_to_rgb(w as u32, h as u32, &out)
}

/// A sketch as a scribble map: pixels darker than half grey become white, the rest black.
pub fn scribble(image: &RgbImage) -> RgbImage {
    let out: Vec<u8> = luma(image)
        .into_iter()
        .map(|v| if v < 128.0 { 255 } else { 0 })
        .collect();
    grey_to_rgb(image.width(), image.height(), &out)
}

/// The index `i` reflected into `0..n` without repeating the edge (OpenCV's
/// `BORDER_REFLECT_101`), folding as often as needed.
fn reflect101(mut i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i;
        } else if i >= n {
            i = 2 * (n - 1) - i;
        } else {
            return i as usize;
        }
    }
}

/// Gaussian blur of one channel plane (`w × h`) with σ = `sigma`, kernel of OpenCV's
/// size for float images (`round(8σ + 1) | 1`), borders reflected (101).
fn gaussian(plane: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    let size = ((sigma * 8.0 + 1.0).round() as usize) | 1;
    let r = (size / 2) as isize;
    let mut kernel: Vec<f32> = (-r..=r)
        .map(|i| (-((i * i) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    let mut tmp = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            tmp[y * w + x] = (-r..=r)
                .map(|k| kernel[(k + r) as usize] * plane[y * w + reflect101(x as isize + k, w)])
                .sum();
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = (-r..=r)
                .map(|k| kernel[(k + r) as usize] * tmp[reflect101(y as isize + k, h) * w + x])
                .sum();
        }
    }
    out
}

/// The lines of a drawing, white on black (the A1111 extension's `lineart_standard`).
pub fn lineart(image: &RgbImage) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let planes: Vec<Vec<f32>> = (0..3)
        .map(|c| image.pixels().map(|p| f32::from(p.0[c])).collect())
        .collect();
    let blurred: Vec<Vec<f32>> = planes.iter().map(|p| gaussian(p, w, h, 6.0)).collect();
    let intensity: Vec<f32> = (0..w * h)
        .map(|i| {
            (0..3)
                .map(|c| blurred[c][i] - planes[c][i])
                .fold(f32::INFINITY, f32::min)
                .clamp(0.0, 255.0)
        })
        .collect();
    let mut drawn: Vec<f32> = intensity.iter().copied().filter(|&v| v > 8.0).collect();
    drawn.sort_by(f32::total_cmp);
    let median = match drawn.len() {
        0 => 0.0,
        n if n % 2 == 1 => drawn[n / 2],
        n => (drawn[n / 2 - 1] + drawn[n / 2]) / 2.0,
    };
    let norm = median.max(16.0);
    let out: Vec<u8> = intensity
        .iter()
        .map(|&v| (v / norm * 127.0).clamp(0.0, 255.0) as u8)
        .collect();
    grey_to_rgb(w as u32, h as u32, &out)
}

/// Fits a control image to `width` × `height` by A1111's resize `mode`:
/// `Stretch` scales each side ("Just Resize"), `Crop` scales to cover and cuts the
/// overflow evenly from both sides ("Crop and Resize"), `Fill` scales to fit inside
/// and pads with the colour of the image's border ("Resize and Fill": the ControlNet
/// extension's median of the outermost rows and columns, [`border_colour`]). An
/// image of that size already is returned unchanged.
pub fn fit(image: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    let (iw, ih) = image.dimensions();
    if (iw, ih) == (width, height) {
        return image.clone();
    }
    let (sx, sy) = (
        f64::from(width) / f64::from(iw),
        f64::from(height) / f64::from(ih),
    );
    let scaled = |s: f64| {
        let nw = ((f64::from(iw) * s).round() as u32).max(1);
        let nh = ((f64::from(ih) * s).round() as u32).max(1);
        image::imageops::resize(image, nw, nh, FilterType::Lanczos3)
    };
    match mode {
        ResizeMode::Stretch => image::imageops::resize(image, width, height, FilterType::Lanczos3),
        ResizeMode::Crop => {
            let big = scaled(sx.max(sy));
            let (bw, bh) = (big.width().max(width), big.height().max(height));
            let big = if (bw, bh) == big.dimensions() {
                big
            } else {
                image::imageops::resize(&big, bw, bh, FilterType::Lanczos3)
            };
            image::imageops::crop_imm(&big, (bw - width) / 2, (bh - height) / 2, width, height)
                .to_image()
        }
        ResizeMode::Fill => {
            let small = scaled(sx.min(sy));
            let (sw, sh) = (small.width().min(width), small.height().min(height));
            let mut canvas = RgbImage::from_pixel(width, height, border_colour(image));
            let (x, y) = ((width - sw) / 2, (height - sh) / 2);
            image::imageops::overlay(&mut canvas, &small, i64::from(x), i64::from(y));
            canvas
        }
    }
}

/// Returns the colour "Resize and Fill" pads with: per channel, the median of the
/// image's outermost rows and columns (corners counted in both), the mean of the two
/// middle values when their number is even, truncated, as numpy's `median` and
/// `astype(uint8)` give in the ControlNet extension.
fn border_colour(image: &RgbImage) -> image::Rgb<u8> {
    let (w, h) = image.dimensions();
    let mut border: Vec<[u8; 3]> = Vec::with_capacity(2 * (w + h) as usize);
    for x in 0..w {
        border.push(image.get_pixel(x, 0).0);
        border.push(image.get_pixel(x, h - 1).0);
    }
    for y in 0..h {
        border.push(image.get_pixel(0, y).0);
        border.push(image.get_pixel(w - 1, y).0);
    }
    let mut out = [0u8; 3];
    for (c, slot) in out.iter_mut().enumerate() {
        let mut v: Vec<u8> = border.iter().map(|p| p[c]).collect();
        v.sort_unstable();
        let mid = v.len() / 2;
        *slot = match v.len() % 2 {
            1 => v[mid],
            _ => ((u16::from(v[mid - 1]) + u16::from(v[mid])) / 2) as u8,
        };
    }
    image::Rgb(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64 px black image with a white square from 16 to 47.
    fn square() -> RgbImage {
        RgbImage::from_fn(64, 64, |x, y| {
            if (16..=47).contains(&x) && (16..=47).contains(&y) {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([0, 0, 0])
            }
        })
    }

    #[test]
    fn canny_finds_the_squares_border_and_nothing_else() {
        let edges = canny(&square(), 100.0, 200.0);
        let near = |x: i32, y: i32| {
            let d = [x - 16, x - 47, y - 16, y - 47].map(i32::abs);
            d.into_iter().min().unwrap_or(99) <= 2
                && (13..=50).contains(&x)
                && (13..=50).contains(&y)
        };
        let on: Vec<(i32, i32)> = edges
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] > 127)
            .map(|(x, y, _)| (x as i32, y as i32))
            .collect();
        assert!(on.len() >= 4 * 30, "only {} edge pixels", on.len());
        let far: Vec<_> = on.iter().filter(|(x, y)| !near(*x, *y)).collect();
        assert!(far.is_empty(), "edges away from the border: {far:?}");
        // Every side of the square has its edge.
        for probe in [(15, 30), (47, 30), (30, 15), (30, 47)] {
            let hit = on
                .iter()
                .any(|&(x, y)| (x - probe.0).abs() <= 1 && (y - probe.1).abs() <= 1);
            assert!(hit, "no edge near {probe:?}");
        }
    }

    #[test]
    fn scribble_inverts_dark_lines() {
        let sketch = RgbImage::from_fn(8, 8, |x, _| {
            if x == 3 {
                image::Rgb([20, 20, 20])
            } else {
                image::Rgb([240, 240, 240])
            }
        });
        let map = scribble(&sketch);
        for (x, _, p) in map.enumerate_pixels() {
            assert_eq!(p.0, if x == 3 { [255; 3] } else { [0; 3] });
        }
    }

    #[test]
    fn lineart_draws_lines_white_on_black() {
        let drawing = RgbImage::from_fn(48, 48, |x, _| {
            if x == 20 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let map = lineart(&drawing);
        let at = |x: u32| map.get_pixel(x, 24).0[0];
        assert!(at(20) > 100, "line {}", at(20));
        assert_eq!(at(5), 0);
        assert_eq!(at(40), 0);
    }

    #[test]
    fn fit_modes_cover_pad_or_stretch() {
        // A 32x16 image: white left half, black right half.
        let wide = RgbImage::from_fn(32, 16, |x, _| {
            if x < 16 {
                image::Rgb([255; 3])
            } else {
                image::Rgb([0; 3])
            }
        });
        for mode in ResizeMode::ALL {
            assert_eq!(fit(&wide, 16, 16, *mode).dimensions(), (16, 16));
        }
        // Fill pads top and bottom with the border's median (half white, half
        // black: 127); crop keeps the middle (half white).
        let filled = fit(&wide, 16, 16, ResizeMode::Fill);
        assert_eq!(filled.get_pixel(2, 0).0, [127; 3]);
        assert!(filled.get_pixel(2, 8).0[0] > 200);
        let cropped = fit(&wide, 16, 16, ResizeMode::Crop);
        assert!(cropped.get_pixel(2, 0).0[0] > 200);
        assert!(cropped.get_pixel(13, 15).0[0] < 50);
        assert_eq!(fit(&wide, 32, 16, ResizeMode::Crop), wide);
    }

    #[test]
    fn fill_pads_with_the_median_colour_of_the_border() {
        // A 24x12 sketch on a paper-coloured background with one dark mark on the edge.
        let paper = image::Rgb([240, 230, 200]);
        let mut sketch = RgbImage::from_pixel(24, 12, paper);
        sketch.put_pixel(0, 5, image::Rgb([0, 0, 0]));
        sketch.put_pixel(10, 6, image::Rgb([0, 0, 0]));
        assert_eq!(border_colour(&sketch), paper);
        let filled = fit(&sketch, 24, 24, ResizeMode::Fill);
        assert_eq!(*filled.get_pixel(12, 0), paper);
        assert_eq!(*filled.get_pixel(12, 23), paper);
        assert_eq!(border_colour(&square()), image::Rgb([0, 0, 0]));
    }
}
