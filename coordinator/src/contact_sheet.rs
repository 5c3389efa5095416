//! A series' contact sheet: every shot in a grid, the anchor first, each
//! labelled with its shot number and seed. Built from the shots' PNGs alone,
//! so equal shots give a byte-identical sheet.

use std::io::Cursor;

use font8x8::UnicodeFonts;
use image::{ImageFormat, Rgb, RgbImage, imageops};

/// Narrowest cell: room for a 19-digit seed in the 8-px font.
const MIN_CELL_WIDTH: u32 = 168;
/// Largest shot side drawn; bigger shots are scaled down to fit.
const MAX_TILE_SIDE: u32 = 256;
/// Space between and around cells.
const GAP: u32 = 8;
/// Height of the two label lines under each shot.
const LABEL_HEIGHT: u32 = 22;
const BACKGROUND: Rgb<u8> = Rgb([32, 32, 36]);
const INK: Rgb<u8> = Rgb([235, 235, 235]);

/// One shot on the sheet.
pub struct Tile {
    /// First label line, e.g. "anchor" or "shot 3".
    pub title: String,
    /// Second label line, e.g. "seed 777".
    pub caption: String,
    /// The shot's PNG.
    pub png: Vec<u8>,
}

/// Why a sheet could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ContactSheetError {
    /// A shot's PNG does not decode.
    #[error("shot {title:?}: {source}")]
    Decode {
        /// The shot's title.
        title: String,
        /// The decoder's error.
        source: image::ImageError,
    },
    /// The sheet could not be encoded.
    #[error("encoding the contact sheet: {0}")]
    Encode(image::ImageError),
}

/// Composes the tiles into one PNG, in order, left to right and top to bottom.
///
/// # Errors
/// When a tile does not decode, or the sheet does not encode.
pub fn compose(tiles: &[Tile]) -> Result<Vec<u8>, ContactSheetError> {
    let mut images = Vec::with_capacity(tiles.len());
    for t in tiles {
        let img = image::load_from_memory_with_format(&t.png, ImageFormat::Png)
            .map_err(|source| ContactSheetError::Decode {
                title: t.title.clone(),
                source,
            })?
            .to_rgb8();
        images.push(fit(img));
    }
    let tile_w = images.iter().map(RgbImage::width).max().unwrap_or(0);
    let tile_h = images.iter().map(RgbImage::height).max().unwrap_or(0);
    let cell_w = tile_w.max(MIN_CELL_WIDTH);
    let cell_h = tile_h + LABEL_HEIGHT;
    let n = tiles.len().max(1) as u32;
    let columns = (f64::from(n).sqrt().ceil() as u32).max(1);
    let rows = n.div_ceil(columns);
    let width = GAP + columns * (cell_w + GAP);
    let height = GAP + rows * (cell_h + GAP);
    let mut sheet = RgbImage::from_pixel(width, height, BACKGROUND);
    for (i, (tile, img)) in tiles.iter().zip(&images).enumerate() {
        let (col, row) = (i as u32 % columns, i as u32 / columns);
        let x = GAP + col * (cell_w + GAP);
        let y = GAP + row * (cell_h + GAP);
        let offset = (cell_w - img.width()) / 2;
        imageops::replace(&mut sheet, img, i64::from(x + offset), i64::from(y));
        draw_text(&mut sheet, x, y + tile_h + 3, cell_w, &tile.title);
        draw_text(&mut sheet, x, y + tile_h + 13, cell_w, &tile.caption);
    }
    let mut out = Cursor::new(Vec::new());
    sheet
        .write_to(&mut out, ImageFormat::Png)
        .map_err(ContactSheetError::Encode)?;
    Ok(out.into_inner())
}

/// Scales an image down (never up) so its longer side is at most [`MAX_TILE_SIDE`].
fn fit(img: RgbImage) -> RgbImage {
    let longest = img.width().max(img.height());
    if longest <= MAX_TILE_SIDE {
        return img;
    }
    let scale = f64::from(MAX_TILE_SIDE) / f64::from(longest);
    let w = ((f64::from(img.width()) * scale).round() as u32).max(1);
    let h = ((f64::from(img.height()) * scale).round() as u32).max(1);
    imageops::resize(&img, w, h, imageops::FilterType::Triangle)
}

/// Draws `text` in the 8x8 font from (x, y), cut at `max_width` pixels;
/// characters without a glyph are drawn as '?'.
fn draw_text(img: &mut RgbImage, x: u32, y: u32, max_width: u32, text: &str) {
    let fonts = font8x8::BASIC_FONTS;
    for (i, ch) in text.chars().take((max_width / 8) as usize).enumerate() {
        let glyph = fonts.get(ch).or_else(|| fonts.get('?')).unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                // font8x8 stores the leftmost pixel in bit 0.
                if bits & (1 << col) != 0 {
                    let (px, py) = (x + i as u32 * 8 + col, y + row as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, INK);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(color: [u8; 3]) -> Vec<u8> {
        let img = RgbImage::from_pixel(64, 64, Rgb(color));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn tiles() -> Vec<Tile> {
        (0..4u8)
            .map(|i| Tile {
                title: if i == 0 {
                    "anchor".into()
                } else {
                    format!("shot {i}")
                },
                caption: format!("seed {}", 9_223_372_036_854_775_807u64 - u64::from(i)),
                png: png([i * 60, 100, 200 - i * 40]),
            })
            .collect()
    }

    #[test]
    fn sheet_is_a_grid_with_labels_and_is_deterministic() {
        let a = compose(&tiles()).unwrap();
        assert_eq!(a, compose(&tiles()).unwrap());
        let sheet = image::load_from_memory(&a).unwrap().to_rgb8();
        // 4 tiles: 2 columns of 168-px cells, 2 rows of 64 + 22 px.
        assert_eq!(sheet.width(), GAP + 2 * (MIN_CELL_WIDTH + GAP));
        assert_eq!(sheet.height(), GAP + 2 * (64 + LABEL_HEIGHT + GAP));
        // The first tile sits centred in its cell; the label has ink under it.
        let (x0, y0) = (GAP + (MIN_CELL_WIDTH - 64) / 2, GAP);
        assert_eq!(*sheet.get_pixel(x0 + 5, y0 + 5), Rgb([0, 100, 200]));
        let ink = (0..MIN_CELL_WIDTH)
            .flat_map(|x| (0..LABEL_HEIGHT).map(move |y| (x, y)))
            .filter(|(x, y)| *sheet.get_pixel(GAP + x, GAP + 64 + y) == INK)
            .count();
        assert!(ink > 50, "labels are drawn");
    }

    #[test]
    fn a_broken_shot_is_named() {
        let mut t = tiles();
        t[2].png.truncate(30);
        let e = compose(&t).unwrap_err();
        assert!(e.to_string().contains("shot 2"), "{e}");
    }
}
