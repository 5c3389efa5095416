//! The metadata text chunks of a rendered PNG: the A1111 `parameters` text
//! and the `kiln` chunk's JSON (tEXt, zTXt or iTXt), as `kiln inspect` prints
//! them and the coordinator's dashboard shows them beside an image.

/// The metadata text chunks of a PNG.
#[derive(Debug, Default, PartialEq)]
pub struct PngText {
    /// The A1111-style `parameters` text, if present.
    pub parameters: Option<String>,
    /// The `kiln` chunk (recipe, hashes, pipeline version) as JSON, if present.
    pub kiln: Option<serde_json::Value>,
}

/// Why a PNG's text chunks could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PngTextError {
    /// The bytes are not a PNG this reader can decode.
    #[error("not a readable PNG: {0}")]
    NotPng(String),
    /// The image is larger than the decoder may allocate.
    #[error("the PNG's image is too large to read")]
    TooLarge,
    /// The image data or the chunks after it are damaged.
    #[error("the PNG's {what} are damaged: {message}")]
    Damaged {
        /// Which part.
        what: &'static str,
        /// The decoder's words.
        message: String,
    },
    /// A compressed or UTF-8 text chunk cannot be decoded.
    #[error("the {kind} chunk {keyword:?} cannot be decoded: {message}")]
    Chunk {
        /// `zTXt` or `iTXt`.
        kind: &'static str,
        /// The chunk's keyword.
        keyword: String,
        /// The decoder's words.
        message: String,
    },
    /// The `kiln` chunk is not JSON.
    #[error("the kiln chunk is not valid JSON: {0}")]
    KilnJson(String),
}

/// Reads the `parameters` and `kiln` chunks of PNG bytes.
///
/// # Errors
/// When the bytes are not a PNG, a text chunk cannot be decompressed, or the
/// `kiln` chunk is not JSON.
pub fn read(bytes: &[u8]) -> Result<PngText, PngTextError> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder
        .read_info()
        .map_err(|e| PngTextError::NotPng(e.to_string()))?;
    // Text chunks may also follow the image data: read through to the end.
    let size = reader.output_buffer_size().ok_or(PngTextError::TooLarge)?;
    let mut pixels = vec![0; size];
    reader
        .next_frame(&mut pixels)
        .map_err(|e| PngTextError::Damaged {
            what: "image data",
            message: e.to_string(),
        })?;
    reader.finish().map_err(|e| PngTextError::Damaged {
        what: "chunks after the image",
        message: e.to_string(),
    })?;
    let info = reader.info();
    let mut texts: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.compressed_latin1_text {
        let text = c.get_text().map_err(|e| PngTextError::Chunk {
            kind: "zTXt",
            keyword: c.keyword.clone(),
            message: e.to_string(),
        })?;
        texts.push((c.keyword.clone(), text));
    }
    for c in &info.utf8_text {
        let text = c.get_text().map_err(|e| PngTextError::Chunk {
            kind: "iTXt",
            keyword: c.keyword.clone(),
            message: e.to_string(),
        })?;
        texts.push((c.keyword.clone(), text));
    }
    let find = |keyword: &str| {
        texts
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, t)| t.clone())
    };
    let kiln = match find("kiln") {
        Some(text) => {
            Some(serde_json::from_str(&text).map_err(|e| PngTextError::KilnJson(e.to_string()))?)
        }
        None => None,
    };
    Ok(PngText {
        parameters: find("parameters"),
        kiln,
    })
}
