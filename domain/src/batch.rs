//! Batch files (TOML): parsed into a `JobSpec`, with every error located by
//! line and named by field before anything is submitted.
//!
//! ```toml
//! name = "assets"          # optional; defaults to the file name
//! project = "studio-a"     # optional
//! priority = 0             # optional; higher runs first
//! notify = ["https://..."] # optional; POSTed to when the job ends
//! [defaults]               # recipe fields every task starts from
//! [sweep]                  # field = [values]: the cross product of all axes
//! [zip]                    # field = [values]: advance together, crossed with [sweep]
//! [[items]]                # explicit tasks, after the sweep
//! [series.NAME]            # a character series: character, anchor, consistency,
//!                          # reference_image, and recipe fields shared by its shots
//! [[series.NAME.shots]]    # one shot: the scene prompt, optional overrides
//! ```
//!
//! `init_image` and `mask` name image files, relative to the batch file; they
//! are read here and sent with the job as blobs.
//!
//! Extras, wherever a recipe field is allowed (and as sweep values):
//!
//! ```toml
//! loras = [{ name = "mira-v3", weight = 0.8 }]          # or unet_weight / te_weight
//! controlnets = [{ model = "pose", image = "poses/run.png", scale = 1.0, start = 0.0,
//!                  end = 1.0, resize = "crop", preprocess = "canny" }]
//! hires = { scale = 2.0, steps = 10, denoise = 0.5, upscaler = "latent" }
//! ```
//!
//! A control `image` is read like `init_image`. Defaults: LoRA weight 1;
//! ControlNet scale 1, start 0, end 1, resize crop, no preprocessor; hires
//! denoise [`DEFAULT_HIRES_DENOISE`], upscaler latent (scale and steps are required).
//!
//! A batch file is UTF-8 text of at most [`MAX_BATCH_BYTES`], with keys and
//! brackets nested at most [`MAX_NESTING`] deep; every refusal is one line,
//! `FILE:LINE: FIELD: what is wrong`.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{FieldError, MAX_QUOTED_CHARS, one_line, quote};
use crate::extras::{
    ControlNetRef, DEFAULT_HIRES_DENOISE, Hires, LoraRef, Preprocessor, ResizeMode, Upscaler,
};
use crate::image::MAX_BLOB_BYTES;
use crate::spec::{
    self, Blob, ExpandedItem, FIELDS, FieldValue, JobSpec, RecipeFields, SeriesSpec, SweepAxis,
};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Largest batch file read: a sweep of 100,000 tasks fits in far less, and a
/// file without end (`/dev/zero`) is refused instead of filling memory.
pub const MAX_BATCH_BYTES: u64 = 16 * 1024 * 1024;

/// Deepest nesting of dotted keys, table headers, arrays and inline tables a
/// batch file may use. kiln's own tables nest three deep
/// (`series.NAME.shots`); the TOML parser stops at 80 without saying where,
/// so deeper files are refused here, with their line.
pub const MAX_NESTING: usize = 32;

/// A batch file refused: where, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field, as in `items[3].width`; empty for syntax errors.
    pub path: String,
    /// What is wrong, quoting the value.
    pub message: String,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", one_line(&self.path, Some(MAX_QUOTED_CHARS)))?;
        }
        write!(f, ": {}", one_line(&self.message, None))
    }
}

impl std::error::Error for BatchError {}

/// A parsed batch file: the spec, plus where each field sits in the file.
#[derive(Debug)]
pub struct Batch {
    /// What to submit.
    pub spec: JobSpec,
    file: String,
    source: String,
    spans: HashMap<String, Range<usize>>,
}

impl Batch {
    /// Reads and parses the batch file at `path`: at most [`MAX_BATCH_BYTES`]
    /// of UTF-8 text.
    ///
    /// # Errors
    /// A file that cannot be read, is too large, is not UTF-8 (with the line
    /// of the first bad byte), or does not parse.
    pub fn read(path: &Path) -> Result<Self, BatchError> {
        let file = path.display().to_string();
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_BATCH_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| BatchError {
                file: file.clone(),
                line: None,
                path: String::new(),
                message: format!("cannot read: {e}"),
            })?;
        Self::parse_bytes(&file, bytes)
    }

    /// Parses a batch file's bytes as [`Batch::read`] does once it has them:
    /// at most [`MAX_BATCH_BYTES`] of UTF-8 text; `file` names it in errors.
    ///
    /// # Errors
    /// Bytes that are too many, not UTF-8 (with the line of the first bad
    /// byte), or do not parse.
    pub fn parse_bytes(file: &str, bytes: Vec<u8>) -> Result<Self, BatchError> {
        if bytes.len() as u64 > MAX_BATCH_BYTES {
            return Err(BatchError {
                file: file.to_string(),
                line: None,
                path: String::new(),
                message: format!(
                    "larger than the limit of {} MiB for a batch file",
                    MAX_BATCH_BYTES / (1024 * 1024)
                ),
            });
        }
        let source = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            // The text before `at` is intact, so a parse of the repaired text
            // says which field holds the bad byte.
            let path = Self::parse(file, &String::from_utf8_lossy(bytes))
                .ok()
                .and_then(|b| b.field_at(at))
                .unwrap_or_default();
            BatchError {
                file: file.to_string(),
                line: Some(bytes[..at].iter().filter(|b| **b == b'\n').count() + 1),
                path,
                message: format!(
                    "not valid UTF-8: byte 0x{:02x} at offset {at}; batch files are UTF-8 text",
                    bytes[at]
                ),
            }
        })?;
        Self::parse(file, &source)
    }

    /// Returns the innermost field whose value covers byte `offset`.
    fn field_at(&self, offset: usize) -> Option<String> {
        self.spans
            .iter()
            .filter(|(_, span)| span.contains(&offset))
            .min_by_key(|(path, span)| (span.len(), std::cmp::Reverse(path.len())))
            .map(|(path, _)| path.clone())
    }

    /// Parses a batch file's text; `file` names it in errors.
    ///
    /// # Errors
    /// The first syntax error, unknown key or wrongly-typed field.
    pub fn parse(file: &str, source: &str) -> Result<Self, BatchError> {
        let mut parser = Parser {
            file: file.to_string(),
            source: source.to_string(),
            spans: HashMap::new(),
            base: Path::new(file)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            blobs: Vec::new(),
        };
        let mut spec = parser.document(source)?;
        spec.blobs = std::mem::take(&mut parser.blobs);
        Ok(Self {
            spec,
            file: parser.file,
            source: parser.source,
            spans: parser.spans,
        })
    }

    /// Runs the coordinator's validation ([`spec::validate`]) locally;
    /// returns the expanded items.
    ///
    /// # Errors
    /// The first invalid field, located in the file.
    pub fn validate(&self) -> Result<Vec<ExpandedItem>, BatchError> {
        spec::validate(&self.spec, 0).map_err(|e| self.locate(&e))
    }

    /// Locates a field error (from local validation or from the coordinator)
    /// in the file: the line of the field, or of its nearest enclosing table.
    pub fn locate(&self, e: &FieldError) -> BatchError {
        let mut path = e.path.as_str();
        let span = loop {
            if let Some(span) = self.spans.get(path) {
                break Some(span.clone());
            }
            match path.rfind(['.', '[']) {
                Some(cut) => path = &path[..cut],
                None => break None,
            }
        };
        BatchError {
            file: self.file.clone(),
            line: span.map(|s| line_of(&self.source, s.start)),
            path: e.path.clone(),
            message: e.message.clone(),
        }
    }
}

/// Returns the 1-based line of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

struct Parser {
    file: String,
    source: String,
    spans: HashMap<String, Range<usize>>,
    /// Folder that image paths are relative to.
    base: PathBuf,
    /// Images read so far, by sha256.
    blobs: Vec<Blob>,
}

impl Parser {
    fn err(&self, path: &str, span: &Range<usize>, message: impl Into<String>) -> BatchError {
        BatchError {
            file: self.file.clone(),
            line: Some(line_of(&self.source, span.start)),
            path: path.to_string(),
            message: message.into(),
        }
    }

    fn document(&mut self, source: &str) -> Result<JobSpec, BatchError> {
        if let Some(line) = too_deep(source) {
            return Err(BatchError {
                file: self.file.clone(),
                line: Some(line),
                path: String::new(),
                message: format!(
                    "keys and brackets are nested more than {MAX_NESTING} levels deep"
                ),
            });
        }
        let root = DeTable::parse(source).map_err(|e| BatchError {
            file: self.file.clone(),
            line: e.span().map(|s| line_of(source, s.start)),
            path: String::new(),
            message: format!("not valid TOML: {}", e.message()),
        })?;
        let mut spec = JobSpec {
            name: default_name(&self.file),
            ..Default::default()
        };
        for (key, value) in root.get_ref() {
            let key_name = key.get_ref().as_ref();
            let span = value.span();
            self.spans.insert(key_name.to_string(), span.clone());
            match key_name {
                "name" => spec.name = self.string(key_name, value)?,
                "project" => spec.project = self.string(key_name, value)?,
                "priority" => {
                    let p = self.integer(key_name, value)?;
                    spec.priority = i32::try_from(p).map_err(|_| {
                        self.err(key_name, &span, format!("must fit in 32 bits, got {p}"))
                    })?;
                }
                "notify" => {
                    let DeValue::Array(urls) = value.get_ref() else {
                        return Err(self.err(
                            "notify",
                            &span,
                            "must be an array of URLs: notify = [\"https://...\"]",
                        ));
                    };
                    for (i, url) in urls.iter().enumerate() {
                        let path = format!("notify[{i}]");
                        self.spans.insert(path.clone(), url.span());
                        spec.notify.push(self.string(&path, url)?);
                    }
                }
                "defaults" => spec.defaults = self.fields("defaults", value)?,
                "sweep" => self.axes("sweep", "", value, &mut spec.sweep)?,
                "zip" => self.axes("zip", "zip", value, &mut spec.sweep)?,
                "items" => {
                    let DeValue::Array(items) = value.get_ref() else {
                        return Err(self.err(
                            "items",
                            &span,
                            "must be an array of tables: write [[items]]",
                        ));
                    };
                    for (i, item) in items.iter().enumerate() {
                        let path = format!("items[{i}]");
                        self.spans.insert(path.clone(), item.span());
                        spec.items.push(self.fields(&path, item)?);
                    }
                }
                "series" => {
                    let table = self.table("series", value)?;
                    for (name, body) in table {
                        let name = name.get_ref().to_string();
                        let path = format!("series.{name}");
                        self.spans.insert(path.clone(), body.span());
                        spec.series.push(self.series(&path, &name, body)?);
                    }
                }
                other => {
                    return Err(self.err(
                        other,
                        &span,
                        format!("unknown key {}; expected one of name, project, priority, notify, defaults, sweep, zip, items, series", quote(other)),
                    ));
                }
            }
        }
        Ok(spec)
    }

    fn table<'a, 'i>(
        &self,
        path: &str,
        value: &'a Spanned<DeValue<'i>>,
    ) -> Result<&'a DeTable<'i>, BatchError> {
        match value.get_ref() {
            DeValue::Table(t) => Ok(t),
            other => Err(self.err(
                path,
                &value.span(),
                format!("must be a table, got {}", kind(other)),
            )),
        }
    }

    fn string(&self, path: &str, value: &Spanned<DeValue<'_>>) -> Result<String, BatchError> {
        match value.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            other => Err(self.err(
                path,
                &value.span(),
                format!("expected a string, got {}", describe(other)),
            )),
        }
    }

    fn boolean(&self, path: &str, value: &Spanned<DeValue<'_>>) -> Result<bool, BatchError> {
        match value.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            other => Err(self.err(
                path,
                &value.span(),
                format!("expected true or false, got {}", describe(other)),
            )),
        }
    }

    /// Reads the image file a field names and returns its sha256.
    fn image(&mut self, path: &str, value: &Spanned<DeValue<'_>>) -> Result<String, BatchError> {
        let name = self.string(path, value)?;
        let file = self.base.join(&name);
        // The name is the user's, as long as the file: quoted, so cut short.
        let shown = quote(&file.display().to_string());
        // At most one byte past the limit: a file without end (`/dev/zero`)
        // is refused instead of filling memory.
        let mut data = Vec::new();
        std::fs::File::open(&file)
            .and_then(|f| f.take(MAX_BLOB_BYTES as u64 + 1).read_to_end(&mut data))
            .map_err(|e| self.err(path, &value.span(), format!("cannot read {shown}: {e}")))?;
        if data.len() > MAX_BLOB_BYTES {
            return Err(self.err(
                path,
                &value.span(),
                format!("{shown}: larger than the limit of {MAX_BLOB_BYTES} bytes for an image"),
            ));
        }
        crate::image::check_image(path, &data)
            .map_err(|e| self.err(path, &value.span(), format!("{shown}: {}", e.message)))?;
        let blob = Blob::new(data);
        let sha = blob.sha256.clone();
        if !self.blobs.iter().any(|b| b.sha256 == sha) {
            self.blobs.push(blob);
        }
        Ok(sha)
    }

    fn integer(&self, path: &str, value: &Spanned<DeValue<'_>>) -> Result<i64, BatchError> {
        match value.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| self.err(path, &value.span(), format!("integer {i} is out of range"))),
            other => Err(self.err(
                path,
                &value.span(),
                format!("expected an integer, got {}", describe(other)),
            )),
        }
    }

    /// Reads the integer recipe field `field`, refusing values its type
    /// cannot hold with the range the recipe accepts.
    fn unsigned(
        &self,
        path: &str,
        field: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<u64, BatchError> {
        let i = self.integer(path, value)?;
        spec::integer_field(path, field, i).map_err(|e| self.err(path, &value.span(), e.message))
    }

    /// Reads `steps`, `width` or `height`.
    fn small(
        &self,
        path: &str,
        field: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<u32, BatchError> {
        let v = self.unsigned(path, field, value)?;
        u32::try_from(v).map_err(|_| self.err(path, &value.span(), format!("{v} is out of range")))
    }

    fn number(&self, path: &str, value: &Spanned<DeValue<'_>>) -> Result<f64, BatchError> {
        match value.get_ref() {
            DeValue::Float(f) => f
                .as_str()
                .parse()
                .map_err(|_| self.err(path, &value.span(), format!("{f} is not a number"))),
            DeValue::Integer(_) => Ok(self.integer(path, value)? as f64),
            other => Err(self.err(
                path,
                &value.span(),
                format!("expected a number, got {}", describe(other)),
            )),
        }
    }

    /// Reads an array of inline tables, registering each entry's span as `path[i]`.
    fn entries<'a, 'i>(
        &mut self,
        path: &str,
        value: &'a Spanned<DeValue<'i>>,
        example: &str,
    ) -> Result<Vec<(String, &'a DeTable<'i>)>, BatchError> {
        let DeValue::Array(list) = value.get_ref() else {
            return Err(self.err(
                path,
                &value.span(),
                format!(
                    "must be a list of tables, got {}: write {example}",
                    describe(value.get_ref())
                ),
            ));
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, entry) in list.iter().enumerate() {
            let at = format!("{path}[{i}]");
            self.spans.insert(at.clone(), entry.span());
            let table = self.table(&at, entry)?;
            out.push((at, table));
        }
        Ok(out)
    }

    /// Refuses a key a table of extras does not know.
    fn unknown_key(&self, at: &str, key: &str, span: &Range<usize>, known: &[&str]) -> BatchError {
        self.err(
            at,
            span,
            format!(
                "unknown key {}; expected one of {}",
                quote(key),
                known.join(", ")
            ),
        )
    }

    /// Reads `loras = [{ name = "...", weight = 0.8 }]`.
    fn loras(
        &mut self,
        path: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<Vec<LoraRef>, BatchError> {
        const KEYS: &[&str] = &["name", "weight", "unet_weight", "te_weight"];
        let mut out = Vec::new();
        for (at, table) in
            self.entries(path, value, "loras = [{ name = \"NAME\", weight = 0.8 }]")?
        {
            let (mut name, mut weight, mut unet, mut te) = (None, None, None, None);
            for (key, v) in table {
                let key = key.get_ref().as_ref();
                let field = format!("{at}.{key}");
                self.spans.insert(field.clone(), v.span());
                match key {
                    "name" => name = Some(self.string(&field, v)?),
                    "weight" => {
                        weight = Some(self.number(&field, v)?);
                        // Validation names the weights the recipe keeps.
                        for alias in ["unet_weight", "te_weight"] {
                            self.spans
                                .entry(format!("{at}.{alias}"))
                                .or_insert_with(|| v.span());
                        }
                    }
                    "unet_weight" => unet = Some(self.number(&field, v)?),
                    "te_weight" => te = Some(self.number(&field, v)?),
                    other => return Err(self.unknown_key(&field, other, &v.span(), KEYS)),
                }
            }
            let span = self.spans[&at].clone();
            let name = name.ok_or_else(|| {
                self.err(
                    &format!("{at}.name"),
                    &span,
                    "missing: name the LoRA (its file stem on the workers)",
                )
            })?;
            let weight = weight.unwrap_or(1.0);
            out.push(LoraRef {
                name,
                hash: String::new(),
                unet_weight: unet.unwrap_or(weight),
                te_weight: te.unwrap_or(weight),
            });
        }
        Ok(out)
    }

    /// Reads `controlnets = [{ model = "...", image = "FILE", ... }]`.
    fn controlnets(
        &mut self,
        path: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<Vec<ControlNetRef>, BatchError> {
        const KEYS: &[&str] = &[
            "model",
            "image",
            "scale",
            "start",
            "end",
            "resize",
            "preprocess",
        ];
        let mut out = Vec::new();
        for (at, table) in self.entries(
            path,
            value,
            "controlnets = [{ model = \"NAME\", image = \"FILE\" }]",
        )? {
            let mut c = ControlNetRef {
                model: String::new(),
                hash: String::new(),
                image: String::new(),
                scale: 1.0,
                start: 0.0,
                end: 1.0,
                resize: ResizeMode::Crop,
                preprocess: None,
            };
            let (mut model, mut image) = (None, None);
            for (key, v) in table {
                let key = key.get_ref().as_ref();
                let field = format!("{at}.{key}");
                self.spans.insert(field.clone(), v.span());
                let located = |e: FieldError| self.err(&field, &v.span(), e.message);
                match key {
                    "model" => model = Some(self.string(&field, v)?),
                    "image" => image = Some(self.image(&field, v)?),
                    "scale" => c.scale = self.number(&field, v)?,
                    "start" => c.start = self.number(&field, v)?,
                    "end" => c.end = self.number(&field, v)?,
                    "resize" => {
                        c.resize =
                            ResizeMode::parse(&field, &self.string(&field, v)?).map_err(located)?
                    }
                    "preprocess" => {
                        c.preprocess = Some(
                            Preprocessor::parse(&field, &self.string(&field, v)?)
                                .map_err(located)?,
                        )
                    }
                    other => return Err(self.unknown_key(&field, other, &v.span(), KEYS)),
                }
            }
            let span = self.spans[&at].clone();
            c.model = model.ok_or_else(|| {
                self.err(
                    &format!("{at}.model"),
                    &span,
                    "missing: name the ControlNet (--controlnet NAME=PATH on the workers)",
                )
            })?;
            c.image = image.ok_or_else(|| {
                self.err(
                    &format!("{at}.image"),
                    &span,
                    "missing: the control image file",
                )
            })?;
            out.push(c);
        }
        Ok(out)
    }

    /// Reads `hires = { scale = 2.0, steps = 10, denoise = 0.5, upscaler = "latent" }`.
    fn hires(&mut self, path: &str, value: &Spanned<DeValue<'_>>) -> Result<Hires, BatchError> {
        const KEYS: &[&str] = &["scale", "steps", "denoise", "upscaler"];
        let table = self.table(path, value)?;
        let (mut scale, mut steps) = (None, None);
        let mut denoise = DEFAULT_HIRES_DENOISE;
        let mut upscaler = Upscaler::Latent;
        for (key, v) in table {
            let key = key.get_ref().as_ref();
            let field = format!("{path}.{key}");
            self.spans.insert(field.clone(), v.span());
            match key {
                "scale" => scale = Some(self.number(&field, v)?),
                "steps" => steps = Some(self.small(&field, "steps", v)?),
                "denoise" => denoise = self.number(&field, v)?,
                "upscaler" => {
                    upscaler = Upscaler::parse(&field, &self.string(&field, v)?)
                        .map_err(|e| self.err(&field, &v.span(), e.message))?
                }
                other => return Err(self.unknown_key(&field, other, &v.span(), KEYS)),
            }
        }
        let missing = |field: &str| {
            self.err(
                &format!("{path}.{field}"),
                &value.span(),
                format!("missing: set {field} in the hires table"),
            )
        };
        Ok(Hires {
            scale: scale.ok_or_else(|| missing("scale"))?,
            steps: steps.ok_or_else(|| missing("steps"))?,
            denoise,
            upscaler,
        })
    }

    /// Reads `[series.NAME]`: the series keys, recipe fields, and its shots.
    fn series(
        &mut self,
        path: &str,
        name: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<SeriesSpec, BatchError> {
        let table = self.table(path, value)?;
        let mut series = SeriesSpec {
            name: name.to_string(),
            ..Default::default()
        };
        let mut recipe: Vec<(&Spanned<toml::de::DeString<'_>>, &Spanned<DeValue<'_>>)> = Vec::new();
        for (key, v) in table {
            let key_name = key.get_ref().as_ref();
            let at = format!("{path}.{key_name}");
            self.spans.insert(at.clone(), v.span());
            match key_name {
                "character" => series.character = self.string(&at, v)?,
                "anchor" => series.anchor = self.boolean(&at, v)?,
                "consistency" => series.consistency = Some(self.number(&at, v)?),
                "reference_image" => series.reference_image = Some(self.image(&at, v)?),
                "shots" => {
                    let DeValue::Array(shots) = v.get_ref() else {
                        return Err(self.err(
                            &at,
                            &v.span(),
                            format!("must be an array of tables: write [[{path}.shots]]"),
                        ));
                    };
                    for (i, shot) in shots.iter().enumerate() {
                        let shot_path = format!("{at}[{i}]");
                        self.spans.insert(shot_path.clone(), shot.span());
                        series.shots.push(self.fields(&shot_path, shot)?);
                    }
                }
                _ => recipe.push((key, v)),
            }
        }
        series.defaults = self.field_list(
            path,
            recipe,
            &[
                "character",
                "anchor",
                "consistency",
                "reference_image",
                "shots",
            ],
        )?;
        Ok(series)
    }

    /// Reads a table of recipe fields (`[defaults]` or one `[[items]]`).
    fn fields(
        &mut self,
        path: &str,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<RecipeFields, BatchError> {
        let table = self.table(path, value)?;
        self.field_list(path, table.iter().collect(), &[])
    }

    /// Reads recipe fields from key/value pairs; `also` lists the other keys
    /// the enclosing table accepts, for the error about an unknown key.
    fn field_list(
        &mut self,
        path: &str,
        pairs: Vec<(&Spanned<toml::de::DeString<'_>>, &Spanned<DeValue<'_>>)>,
        also: &[&str],
    ) -> Result<RecipeFields, BatchError> {
        let mut f = RecipeFields::default();
        for (key, v) in pairs {
            let name = key.get_ref().as_ref();
            let at = format!("{path}.{name}");
            self.spans.insert(at.clone(), v.span());
            match name {
                "model" => f.model = Some(self.string(&at, v)?),
                "prompt" => f.prompt = Some(self.string(&at, v)?),
                "negative_prompt" => f.negative_prompt = Some(self.string(&at, v)?),
                "scheduler" => f.scheduler = Some(self.string(&at, v)?),
                "seed" => f.seed = Some(self.unsigned(&at, name, v)?),
                "steps" => f.steps = Some(self.small(&at, name, v)?),
                "width" => f.width = Some(self.small(&at, name, v)?),
                "height" => f.height = Some(self.small(&at, name, v)?),
                "guidance" => f.guidance = Some(self.number(&at, v)?),
                "eta" => f.eta = Some(self.number(&at, v)?),
                "strength" => f.strength = Some(self.number(&at, v)?),
                "karras" => f.karras = Some(self.boolean(&at, v)?),
                "init_image" => f.init_image = Some(self.image(&at, v)?),
                "mask" => f.mask = Some(self.image(&at, v)?),
                "loras" => f.loras = Some(self.loras(&at, v)?),
                "controlnets" => f.controlnets = Some(self.controlnets(&at, v)?),
                "hires" => f.hires = Some(self.hires(&at, v)?),
                other => {
                    let mut known: Vec<&str> = also.to_vec();
                    known.extend_from_slice(FIELDS);
                    return Err(self.err(
                        &at,
                        &v.span(),
                        format!(
                            "unknown field {}; expected one of {}",
                            quote(other),
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(f)
    }

    /// Reads `[sweep]` or `[zip]`: each key a recipe field, each value a list.
    fn axes(
        &mut self,
        path: &str,
        zip: &str,
        value: &Spanned<DeValue<'_>>,
        out: &mut Vec<SweepAxis>,
    ) -> Result<(), BatchError> {
        let table = self.table(path, value)?;
        for (key, v) in table {
            let field = key.get_ref().to_string();
            // Expansion reports sweep errors as `sweep.<field>[i]` whichever table they came from.
            let at = format!("sweep.{field}");
            self.spans.insert(at.clone(), v.span());
            let DeValue::Array(values) = v.get_ref() else {
                return Err(self.err(
                    &at,
                    &v.span(),
                    format!("must be a list of values, got {}", describe(v.get_ref())),
                ));
            };
            let mut axis = SweepAxis {
                field: field.clone(),
                values: Vec::with_capacity(values.len()),
                zip: zip.to_string(),
            };
            for (i, item) in values.iter().enumerate() {
                let item_path = format!("{at}[{i}]");
                self.spans.insert(item_path.clone(), item.span());
                let value = match item.get_ref() {
                    _ if field == "loras" => FieldValue::Loras(self.loras(&item_path, item)?),
                    _ if field == "controlnets" => {
                        FieldValue::ControlNets(self.controlnets(&item_path, item)?)
                    }
                    _ if field == "hires" => FieldValue::Hires(self.hires(&item_path, item)?),
                    DeValue::String(_) if matches!(field.as_str(), "init_image" | "mask") => {
                        FieldValue::Text(self.image(&item_path, item)?)
                    }
                    DeValue::String(s) => FieldValue::Text(s.to_string()),
                    DeValue::Boolean(b) => FieldValue::Flag(*b),
                    DeValue::Integer(_) => FieldValue::Integer(self.integer(&item_path, item)?),
                    DeValue::Float(_) => FieldValue::Number(self.number(&item_path, item)?),
                    other => {
                        return Err(self.err(
                            &item_path,
                            &item.span(),
                            format!(
                                "sweep values must be strings, numbers or booleans, got {}",
                                describe(other)
                            ),
                        ));
                    }
                };
                axis.values.push(value);
            }
            out.push(axis);
        }
        Ok(())
    }
}

/// Returns the line of the first statement nested more than [`MAX_NESTING`]
/// levels deep, counting the dots of keys and the brackets and braces of
/// headers, arrays and inline tables; strings and comments are skipped. It
/// is a scan, not a parser: what it lets through, toml parses and judges.
fn too_deep(source: &str) -> Option<usize> {
    let b = source.as_bytes();
    let mut line = 1;
    let mut i = 0;
    // Open arrays and inline tables of the current value.
    let mut open: Vec<u8> = Vec::new();
    // Key dots of the statement; and, per open inline table, their number at its `{`.
    let mut dots = 0;
    let mut dots_at_brace: Vec<usize> = Vec::new();
    // Reading a key (line start, or after `{` or `,` in an inline table).
    let mut in_key = true;
    // Inside a `[table]` or `[[array]]` header.
    let mut header = false;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                if open.is_empty() {
                    in_key = true;
                    header = false;
                    dots = 0;
                }
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                i = skip_string(b, i, &mut line);
                continue;
            }
            b'.' if in_key || header => dots += 1,
            b'=' if !header => in_key = false,
            b'[' if in_key && open.is_empty() && !header => {
                header = true;
                dots = 1;
            }
            b']' if header => {
                header = false;
                in_key = false;
            }
            b'[' if !in_key => open.push(c),
            b'{' if !in_key => {
                open.push(c);
                dots_at_brace.push(dots);
                in_key = true;
            }
            b',' if open.last() == Some(&b'{') => {
                in_key = true;
                dots = dots_at_brace.last().copied().unwrap_or(0);
            }
            b']' => {
                open.pop();
            }
            b'}' => {
                open.pop();
                dots = dots_at_brace.pop().unwrap_or(0);
                in_key = false;
            }
            _ => {}
        }
        if dots + open.len() > MAX_NESTING {
            return Some(line);
        }
        i += 1;
    }
    None
}

/// Returns the index after the string that starts at `b[i]` (basic or
/// literal, single- or multi-line), counting the lines it spans.
fn skip_string(b: &[u8], mut i: usize, line: &mut usize) -> usize {
    let quote = b[i];
    let multi = b.get(i..i + 3) == Some(&[quote, quote, quote][..]);
    i += if multi { 3 } else { 1 };
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && quote == b'"' {
            if b.get(i + 1) == Some(&b'\n') {
                *line += 1;
            }
            i += 2;
            continue;
        }
        if c == b'\n' {
            if !multi {
                // An unterminated string: toml reports it; the caller sees the line end.
                return i;
            }
            *line += 1;
        }
        if c == quote && (!multi || b.get(i..i + 3) == Some(&[quote, quote, quote][..])) {
            return i + if multi { 3 } else { 1 };
        }
        i += 1;
    }
    i
}

/// Returns the file's stem as the job's default name.
fn default_name(file: &str) -> String {
    std::path::Path::new(file)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

fn describe(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("string {}", quote(s)),
        DeValue::Integer(i) => format!("integer {i}"),
        DeValue::Float(f) => format!("float {f}"),
        DeValue::Boolean(b) => format!("boolean {b}"),
        other => kind(other).to_string(),
    }
}

#[cfg(test)]
#[path = "batch_extras_tests.rs"]
mod extras_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch file of issue #2, word for word.
    const ISSUE_BATCH: &str = r#"[defaults]
model = "tiny"
width = 64
height = 64
steps = 4
guidance = 5.0
scheduler = "ddim"
negative_prompt = "blurry, low quality"

[sweep]
prompt = ["a red fox sitting on a mossy stone, watercolor", "a vintage camera with brass lenses, steampunk"]
seed = [1, 2, 3, 4]

[[items]]
prompt = "a lighthouse at dusk"
seed = 42
"#;

    #[test]
    fn the_issue_batch_gives_nine_tasks() {
        let batch = Batch::parse("shots.toml", ISSUE_BATCH).unwrap();
        assert_eq!(batch.spec.name, "shots");
        let items = batch.validate().unwrap();
        assert_eq!(items.len(), 9);
        assert_eq!(
            items[0].recipe.prompt,
            "a red fox sitting on a mossy stone, watercolor"
        );
        assert_eq!(items[0].recipe.seed, 1);
        assert_eq!(items[7].recipe.seed, 4);
        assert_eq!(items[8].recipe.prompt, "a lighthouse at dusk");
        assert_eq!(items[8].recipe.seed, 42);
        assert!(
            items
                .iter()
                .all(|i| i.recipe.negative_prompt == "blurry, low quality")
        );
    }

    fn error_of(text: &str) -> BatchError {
        match Batch::parse("b.toml", text) {
            Err(e) => e,
            Ok(b) => b.validate().expect_err("the batch must be refused"),
        }
    }

    #[test]
    fn errors_carry_line_and_field() {
        let e = error_of(&ISSUE_BATCH.replace("width = 64", "width = 63"));
        assert_eq!((e.line, e.path.as_str()), (Some(3), "defaults.width"));
        assert!(e.message.contains("63"));
        assert_eq!(
            e.to_string(),
            "b.toml:3: defaults.width: must be a multiple of 8 between 64 and 2048, got 63"
        );

        let e = error_of(&ISSUE_BATCH.replace("steps = 4", "steps = 0"));
        assert_eq!((e.line, e.path.as_str()), (Some(5), "defaults.steps"));

        let e = error_of(&ISSUE_BATCH.replace("\"ddim\"", "\"plms\""));
        assert_eq!((e.line, e.path.as_str()), (Some(7), "defaults.scheduler"));

        let e = error_of(&ISSUE_BATCH.replace("seed = [1, 2, 3, 4]", "seed = [1, 2, \"x\", 4]"));
        assert_eq!((e.line, e.path.as_str()), (Some(12), "sweep.seed[2]"));

        let e = error_of(&ISSUE_BATCH.replace("seed = 42", "seed = -1"));
        assert_eq!((e.line, e.path.as_str()), (Some(16), "items[0].seed"));

        let e = error_of(&ISSUE_BATCH.replace("width = 64", "width = \"64\""));
        assert_eq!((e.line, e.path.as_str()), (Some(3), "defaults.width"));
        assert!(e.message.contains("expected an integer"), "{e}");

        let e = error_of(&ISSUE_BATCH.replace("height = 64", "heigth = 64"));
        assert_eq!((e.line, e.path.as_str()), (Some(4), "defaults.heigth"));
    }

    #[test]
    fn webhook_urls_are_read_and_refused_by_line() {
        let text = format!("notify = [\"https://studio.example/hooks/kiln\"]\n{ISSUE_BATCH}");
        let batch = Batch::parse("b.toml", &text).unwrap();
        assert_eq!(batch.spec.notify, ["https://studio.example/hooks/kiln"]);
        let text = format!(
            "notify = [\n  \"https://ok.example/\",\n  \"ftp://no.example/\",\n]\n{ISSUE_BATCH}"
        );
        let e = error_of(&text);
        assert_eq!((e.line, e.path.as_str()), (Some(3), "notify[1]"));
        assert!(e.message.contains("http:// or https://"), "{e}");
        let e = error_of(&format!("notify = \"https://one.example/\"\n{ISSUE_BATCH}"));
        assert_eq!((e.line, e.path.as_str()), (Some(1), "notify"));
    }

    #[test]
    fn malformed_toml_is_refused_with_its_line() {
        let e = error_of(&ISSUE_BATCH.replace("steps = 4", "steps = = 4"));
        assert_eq!(e.line, Some(5));
        assert!(e.message.starts_with("not valid TOML"), "{e}");
    }

    #[test]
    fn image_paths_become_blobs_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10]));
        img.save(dir.path().join("ref.png")).unwrap();
        let file = dir.path().join("b.toml");
        let text = "[defaults]\nmodel = \"tiny\"\nwidth = 64\nheight = 64\n[[items]]\nprompt = \"x\"\ninit_image = \"ref.png\"\nstrength = 0.5\n[[items]]\nprompt = \"y\"\ninit_image = \"missing.png\"\n";
        let e = Batch::parse(file.to_str().unwrap(), text).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (Some(11), "items[1].init_image"));
        assert!(e.message.contains("missing.png"), "{e}");
        let ok = text.replace("missing.png", "ref.png");
        let batch = Batch::parse(file.to_str().unwrap(), &ok).unwrap();
        assert_eq!(batch.spec.blobs.len(), 1, "the same file is sent once");
        let items = batch.validate().unwrap();
        assert_eq!(
            items[0].recipe.init_image.as_deref(),
            Some(batch.spec.blobs[0].sha256.as_str())
        );
        assert_eq!(items[0].recipe.strength, 0.5);
    }

    /// The series of issue #5, word for word.
    const MIRA: &str = r#"[series.mira]
model = "tiny"
character = "Mira, a young cartographer with a short copper bob, round glasses and a green wool coat"
negative_prompt = "extra fingers, deformed hands"
seed = 777
width = 64
height = 64
steps = 6
anchor = true
consistency = 0.6

[[series.mira.shots]]
prompt = "standing on a cliff at sunrise, wind in her coat"
[[series.mira.shots]]
prompt = "reading a map by candlelight in a library"
[[series.mira.shots]]
prompt = "running through a rainy market street"
seed = 9001
"#;

    #[test]
    fn the_issue_series_gives_an_anchor_and_three_shots() {
        let batch = Batch::parse("series.toml", MIRA).unwrap();
        let items = batch.validate().unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].file_name, "00000-mira-anchor.png");
        assert!(
            items[1]
                .recipe
                .prompt
                .ends_with(", standing on a cliff at sunrise, wind in her coat")
        );
        assert_eq!(items[3].recipe.seed, 9001);
        assert_eq!(items[1].recipe.width, 64);
    }

    #[test]
    fn series_errors_carry_line_and_field() {
        let e = error_of(&MIRA.replace("consistency = 0.6", "consistency = 1.6"));
        assert_eq!(
            (e.line, e.path.as_str()),
            (Some(10), "series.mira.consistency")
        );
        let e = error_of(&MIRA.replace("seed = 9001", "steps = 0"));
        assert_eq!(
            (e.line, e.path.as_str()),
            (Some(18), "series.mira.shots[2].steps")
        );
        let e = error_of(&MIRA.replace("anchor = true", "anchor = \"yes\""));
        assert_eq!((e.line, e.path.as_str()), (Some(9), "series.mira.anchor"));
        let e = error_of(&MIRA.replace("steps = 6", "stpes = 6"));
        assert_eq!((e.line, e.path.as_str()), (Some(8), "series.mira.stpes"));
        assert!(e.message.contains("consistency"), "{e}");
    }

    #[test]
    fn nesting_is_counted_in_keys_and_brackets_but_not_in_strings() {
        let deep_key = format!("[defaults]\nmodel = \"tiny\"\na{} = 1\n", ".a".repeat(40));
        assert_eq!(too_deep(&deep_key), Some(3));
        let deep_header = format!("# a comment\n[a{}]\n", ".a".repeat(40));
        assert_eq!(too_deep(&deep_header), Some(2));
        let deep_array = format!("x = 1\n\ny = {}1{}\n", "[".repeat(40), "]".repeat(40));
        assert_eq!(too_deep(&deep_array), Some(3));
        let deep_inline = format!("z = {}{}\n", "{a.b = ".repeat(20), "}".repeat(20));
        assert_eq!(too_deep(&deep_inline), Some(1));
        // Dots and brackets inside strings, comments and values are not nesting.
        let flat = format!(
            "a = \"{dots}\"\nb = '{dots}'\nc = \"\"\"\n{dots}[[[[\n\"\"\"\n# {dots}\nd = 1.5\n{many}",
            dots = ".".repeat(100),
            many = "[series.\"x.y\".shots]\n".repeat(50)
        );
        assert_eq!(too_deep(&flat), None);
        let many_keys = format!(
            "t = {{ {} }}\n",
            (0..50)
                .map(|i| format!("k{i}.v = 1"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(
            too_deep(&many_keys),
            None,
            "siblings in an inline table do not nest"
        );
        assert_eq!(too_deep(ISSUE_BATCH), None);
        assert_eq!(too_deep(MIRA), None);
        let e = error_of(&deep_key);
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("32"), "{e}");
    }

    #[test]
    fn files_are_read_within_the_size_cap_and_as_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("u.toml");
        std::fs::write(
            &file,
            b"[defaults]\nmodel = \"tiny\"\n[[items]]\nprompt = \"fox \xff\"\n",
        )
        .unwrap();
        let e = Batch::read(&file).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (Some(4), "items[0].prompt"));
        assert!(e.message.contains("UTF-8"), "{e}");
        let missing = Batch::read(&dir.path().join("none.toml")).unwrap_err();
        assert!(missing.message.starts_with("cannot read"), "{missing}");
        let big = dir.path().join("big.toml");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_BATCH_BYTES + 1).unwrap();
        let e = Batch::read(&big).unwrap_err();
        assert_eq!(e.line, None);
        assert!(e.message.contains("16 MiB"), "{e}");
    }

    /// An image file was read whole: `init_image = "/dev/zero"` filled memory.
    #[cfg(unix)]
    #[test]
    fn regression_an_endless_image_file_is_refused_at_the_limit() {
        let text =
            "[defaults]\nmodel = \"tiny\"\n[[items]]\nprompt = \"x\"\ninit_image = \"/dev/zero\"\n";
        let e = Batch::parse("b.toml", text).unwrap_err();
        assert_eq!((e.line, e.path.as_str()), (Some(5), "items[0].init_image"));
        assert!(
            e.message
                .contains("larger than the limit of 33554432 bytes"),
            "{e}"
        );
    }

    #[test]
    fn zip_axes_advance_together() {
        let text = r#"
[defaults]
model = "tiny"
width = 64
height = 64
[zip]
prompt = ["a", "b", "c"]
seed = [7, 8, 9]
[sweep]
steps = [2, 3]
"#;
        let items = Batch::parse("z.toml", text).unwrap().validate().unwrap();
        assert_eq!(items.len(), 6);
        let pairs: Vec<_> = items
            .iter()
            .map(|i| (i.recipe.prompt.as_str(), i.recipe.seed))
            .collect();
        assert_eq!(pairs[0], ("a", 7));
        assert!(pairs.contains(&("c", 9)));
        assert!(!pairs.contains(&("a", 8)));
    }

    /// Property tests: whatever text or bytes a batch file holds, parsing and
    /// local validation never panic, and every refusal is one line that
    /// starts with the file and, for text, the line it is about.
    mod properties {
        use proptest::prelude::*;

        use super::super::*;
        use super::error_of;

        /// The file name errors start with. Its folder does not exist, so an
        /// `init_image` the generator writes never reads a real file.
        const FILE: &str = "no-such-dir/b.toml";

        /// Longest refusal accepted, file and field included: values are
        /// quoted cut short, so a long one never comes back whole.
        const MAX_ERROR_BYTES: usize = 2048;

        /// 256 cases unless `PROPTEST_CASES` asks for another number;
        /// failures are kept as ordinary `#[test]`s, not in a file.
        fn config() -> ProptestConfig {
            let mut config = ProptestConfig::default();
            if std::env::var_os("PROPTEST_CASES").is_none() {
                config.cases = 256;
            }
            config.failure_persistence = None;
            config
        }

        /// Table headers kiln knows, ones it does not, and malformed or deep ones.
        fn header() -> impl Strategy<Value = String> {
            prop_oneof![
                8 => prop::sample::select(vec![
                    "[defaults]",
                    "[[items]]",
                    "[sweep]",
                    "[zip]",
                    "[series.hero]",
                    "[[series.hero.shots]]",
                    "[series.\"a b\"]",
                    "[series.\"..\"]",
                    "[series.\"new\\nline\"]",
                    "[[series.\"new\\nline\".shots]]",
                    "[items]",
                    "[[defaults]]",
                    "[series]",
                    "[[series]]",
                    "[defaults.model]",
                    "[other]",
                    "[\"\\u001b[31m\"]",
                    "[",
                    "[[items]",
                ])
                .prop_map(str::to_string),
                1 => (1usize..40).prop_map(|n| format!("[{}x]", "a.".repeat(n))),
            ]
        }

        /// Keys: recipe fields, top-level and series keys, and odd ones
        /// (quoted with escapes, dotted, misspelt).
        fn key() -> impl Strategy<Value = String> {
            let mut known: Vec<&'static str> = FIELDS.to_vec();
            known.extend([
                "name",
                "project",
                "priority",
                "notify",
                "defaults",
                "sweep",
                "zip",
                "items",
                "series",
                "character",
                "anchor",
                "consistency",
                "reference_image",
                "shots",
            ]);
            prop_oneof![
                8 => prop::sample::select(known).prop_map(str::to_string),
                1 => prop::sample::select(vec![
                    "heigth",
                    "\"new\\nline\"",
                    "\"tab\\there\"",
                    "\"\\u0000\"",
                    "\"\\u001b[2J\"",
                    "'lit eral'",
                    "a.b",
                    "series.hero.character",
                    "\"\"",
                    "é",
                ])
                .prop_map(str::to_string),
                1 => "[a-z_]{1,8}",
                1 => (1000usize..5000).prop_map(|n| format!("\"{}\"", "k".repeat(n))),
            ]
        }

        /// Values of every TOML type, in and out of the fields' ranges,
        /// including long strings and deep arrays.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                8 => prop::sample::select(vec![
                    "\"tiny\"",
                    "\"a red fox\"",
                    "\"(a cat:1.3) BREAK [dog]\"",
                    "\"(word:abc)\"",
                    "\"ddim\"",
                    "\"euler\"",
                    "\"plms\"",
                    "'literal'",
                    "\"\"\"multi\nline\"\"\"",
                    "'''multi\nliteral'''",
                    "\"new\\nline\"",
                    "\"\\u001b[31m\"",
                    "\"\\u0000\"",
                    "\"..\"",
                    "\"x.png\"",
                    "64",
                    "512",
                    "63",
                    "0",
                    "-1",
                    "4",
                    "42",
                    "9223372036854775807",
                    "-9223372036854775808",
                    "4294967296",
                    "0x10",
                    "1.5",
                    "0.5",
                    "7.5",
                    "1e400",
                    "nan",
                    "inf",
                    "-inf",
                    "-0.0",
                    "true",
                    "false",
                    "1979-05-27T07:32:00Z",
                    "07:32:00",
                    "[1, 2, 3]",
                    "[\"a\", \"b\"]",
                    "[1, \"x\", true]",
                    "[2.5, 7]",
                    "[]",
                    "[[1], [2]]",
                    "[{ a = 1 }]",
                    "{ model = \"tiny\" }",
                    "{}",
                    "{ a = { b = 1 } }",
                ])
                .prop_map(str::to_string),
                1 => (1usize..40).prop_map(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n))),
                1 => (1usize..40).prop_map(|n| format!("{}{}", "{ a = ".repeat(n), "1 }".repeat(n))),
                1 => (1000usize..5000).prop_map(|n| format!("\"{}\"", "x".repeat(n))),
                1 => "[ -~]{0,12}",
            ]
        }

        /// One line of a batch file: a header, `key = value`, a comment,
        /// nothing, or arbitrary characters.
        fn line() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => header(),
                8 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
                1 => Just("# comment \"[x]\"".to_string()),
                1 => Just(String::new()),
                1 => any::<String>().prop_map(|s| s.chars().take(16).collect()),
            ]
        }

        /// A batch file of a few lines, often starting with a model and a
        /// prompt so that some files get as far as validation.
        fn fragments() -> impl Strategy<Value = String> {
            (any::<bool>(), prop::collection::vec(line(), 0..12)).prop_map(|(valid_start, lines)| {
                let start = if valid_start {
                    "[defaults]\nmodel = \"tiny\"\nprompt = \"a fox\"\nwidth = 64\nheight = 64\n"
                } else {
                    ""
                };
                format!("{start}{}\n", lines.join("\n"))
            })
        }

        /// Lines `key = value` for distinct keys: each key appears with its
        /// chance, with one of its values.
        fn keyed(
            keys: &[(&'static str, f64, &'static [&'static str])],
        ) -> impl Strategy<Value = Vec<String>> + use<> {
            let lines: Vec<_> = keys
                .iter()
                .map(|&(key, chance, values)| {
                    prop::option::weighted(chance, prop::sample::select(values.to_vec()))
                        .prop_map(move |v| v.map(|v| format!("{key} = {v}")))
                })
                .collect();
            lines.prop_map(|lines| lines.into_iter().flatten().collect())
        }

        /// Recipe fields with values of their type, sometimes out of range.
        fn recipe_lines(model: f64, prompt: f64) -> impl Strategy<Value = Vec<String>> {
            keyed(&[
                (
                    "model",
                    model,
                    &["\"tiny\"", "\"tiny\"", "\"tiny\"", "\"bad name\""],
                ),
                (
                    "prompt",
                    prompt,
                    &[
                        "\"a red fox\"",
                        "\"(a:1.2) BREAK [b]\"",
                        "\"a\"",
                        "\"(a:x)\"",
                    ],
                ),
                ("negative_prompt", 0.1, &["\"blurry\""]),
                ("seed", 0.2, &["42", "0", "7", "-1"]),
                ("steps", 0.2, &["4", "2", "3", "0"]),
                ("width", 0.3, &["64", "72", "64", "63"]),
                ("height", 0.3, &["128"]),
                ("guidance", 0.1, &["7.5", "5", "60"]),
                (
                    "scheduler",
                    0.2,
                    &["\"euler\"", "\"ddim\"", "\"ddim\"", "\"plms\""],
                ),
                ("karras", 0.05, &["true", "false"]),
                ("eta", 0.05, &["0.0", "0.5"]),
                ("strength", 0.05, &["0.6"]),
            ])
        }

        /// Sweep or zip axes.
        fn axis_lines() -> impl Strategy<Value = Vec<String>> {
            keyed(&[
                ("prompt", 0.5, &["[\"a\", \"(b:1.5)\"]"]),
                ("seed", 0.4, &["[1, 2, 3]", "[4, 5]", "[1, \"x\"]"]),
                ("steps", 0.2, &["[2, 3]"]),
                ("guidance", 0.2, &["[5, 7.5]"]),
                ("scheduler", 0.1, &["[\"ddim\", \"euler\"]"]),
                ("width", 0.2, &["[64, 72]", "[64]", "[64, 65]"]),
            ])
        }

        /// A well-formed file: `[defaults]`, maybe a sweep and a zip, items,
        /// maybe a series with shots, and now and then a line from [`line`].
        fn structured() -> impl Strategy<Value = String> {
            let series = (
                keyed(&[
                    ("character", 0.9, &["\"a knight\""]),
                    ("anchor", 0.5, &["true", "false"]),
                    ("consistency", 0.3, &["0.5", "0.25", "2.0"]),
                    ("seed", 0.2, &["7"]),
                ]),
                prop::collection::vec(recipe_lines(0.1, 0.7), 0..3),
            );
            (
                recipe_lines(0.9, 0.6),
                prop::option::weighted(0.4, axis_lines()),
                prop::option::weighted(0.2, axis_lines()),
                prop::collection::vec(recipe_lines(0.1, 0.8), 1..3),
                prop::option::weighted(0.4, series),
                prop::option::weighted(0.2, line()),
            )
                .prop_map(|(defaults, sweep, zip, items, series, extra)| {
                    let mut lines = vec!["[defaults]".to_string()];
                    lines.extend(defaults);
                    for (header, axes) in [("[sweep]", sweep), ("[zip]", zip)] {
                        if let Some(axes) = axes {
                            lines.push(header.to_string());
                            lines.extend(axes);
                        }
                    }
                    for item in items {
                        lines.push("[[items]]".to_string());
                        lines.extend(item);
                    }
                    if let Some((settings, shots)) = series {
                        lines.push("[series.hero]".to_string());
                        lines.extend(settings);
                        for shot in shots {
                            lines.push("[[series.hero.shots]]".to_string());
                            lines.extend(shot);
                        }
                    }
                    lines.extend(extra);
                    lines.join("\n") + "\n"
                })
        }

        /// Batch files: well-formed ones, or lines of fragments that rarely
        /// make a valid file.
        fn batch_text() -> impl Strategy<Value = String> {
            prop_oneof![structured(), fragments()]
        }

        /// Checks the shape of a refusal: one line, bounded, starting with
        /// the file and, when the error has a line, `:LINE:` within the text.
        fn check(e: &BatchError, lines: usize) -> Result<(), TestCaseError> {
            let shown = e.to_string();
            prop_assert!(!shown.contains(['\n', '\r']), "not one line: {:?}", shown);
            prop_assert!(
                shown.len() < MAX_ERROR_BYTES,
                "{} bytes: {:.300}",
                shown.len(),
                shown
            );
            prop_assert_eq!(e.file.as_str(), FILE);
            match e.line {
                Some(line) => {
                    prop_assert!(
                        (1..=lines).contains(&line),
                        "line {} of {}: {}",
                        line,
                        lines,
                        shown
                    );
                    let prefix = format!("{FILE}:{line}: ");
                    prop_assert!(shown.starts_with(&prefix), "{}", shown);
                }
                None => prop_assert!(shown.starts_with(&format!("{FILE}: ")), "{}", shown),
            }
            Ok(())
        }

        /// Lines a text has for an error to point at, a last line without
        /// its newline included.
        fn lines_of(text: &str) -> usize {
            text.split('\n').count()
        }

        /// A quoted key may hold a line break: the refusal showed it raw
        /// and took two lines, one of them without the file.
        #[test]
        fn regression_a_key_with_a_line_break_is_refused_on_one_line() {
            let e = error_of("\"new\\nline\" = \"tiny\"\n");
            assert_eq!(e.path, "new\nline");
            assert_eq!(
                e.to_string(),
                "b.toml:1: new\\nline: unknown key \"new\\nline\"; expected one of name, project, priority, notify, defaults, sweep, zip, items, series"
            );
            // The same through validation: the series name is checked there.
            let text = "[defaults]\nmodel = \"tiny\"\n[series.\"a\\u001b[2J\"]\ncharacter = \"a knight\"\n[[series.\"a\\u001b[2J\".shots]]\nprompt = \"b\"\n";
            let e = error_of(text);
            assert_eq!(e.line, Some(3), "{e}");
            let shown = e.to_string();
            assert!(
                shown.starts_with("b.toml:3: series.a\\u{1b}[2J: "),
                "{shown}"
            );
            assert!(!shown.contains(char::is_control), "{shown}");
        }

        /// String values, unknown keys and image names were quoted whole:
        /// one long value made a refusal as long as the file.
        #[test]
        fn regression_long_values_keys_and_image_names_are_quoted_short() {
            let long = "x".repeat(5_000);
            for text in [
                format!("[defaults]\nseed = \"{long}\"\n"),
                format!("[defaults]\n\"{long}\" = 1\n"),
                format!("\"{long}\" = 1\n"),
                format!("[defaults]\ninit_image = \"{long}\"\n"),
            ] {
                let shown = error_of(&text).to_string();
                assert!(
                    shown.len() < MAX_ERROR_BYTES,
                    "{}: {shown:.300}",
                    shown.len()
                );
                assert!(
                    shown.contains("(5000 bytes)") || shown.contains('…'),
                    "{shown:.300}"
                );
            }
        }

        proptest! {
            #![proptest_config(config())]

            /// Any text parses, or is refused with one line at a line of
            /// the text; what parses is validated and refused the same way.
            #[test]
            fn batch_text_never_panics_and_errors_are_located(text in batch_text()) {
                let lines = lines_of(&text);
                match Batch::parse(FILE, &text) {
                    Err(e) => {
                        check(&e, lines)?;
                        prop_assert!(e.line.is_some(), "text error without a line: {}", e);
                    }
                    Ok(batch) => match batch.validate() {
                        Err(e) => check(&e, lines)?,
                        Ok(items) => prop_assert!(!items.is_empty()),
                    },
                }
            }

            /// Bytes, valid UTF-8 or not, never panic; invalid UTF-8 is
            /// refused at the line of its first bad byte.
            #[test]
            fn batch_bytes_never_panic_and_bad_utf8_names_its_line(
                text in batch_text(),
                junk in prop::collection::vec(any::<u8>(), 0..6),
                at in any::<prop::sample::Index>(),
            ) {
                let mut bytes = text.into_bytes();
                let cut = at.index(bytes.len() + 1);
                bytes.splice(cut..cut, junk);
                let utf8 = std::str::from_utf8(&bytes).map(str::to_string);
                match Batch::parse_bytes(FILE, bytes.clone()) {
                    Ok(batch) => prop_assert!(utf8.is_ok(), "bad UTF-8 accepted: {:?}", batch.spec),
                    Err(e) => match &utf8 {
                        Ok(text) => {
                            check(&e, lines_of(text))?;
                            prop_assert!(e.line.is_some(), "text error without a line: {}", e);
                        }
                        Err(bad) => {
                            check(&e, lines_of(&String::from_utf8_lossy(&bytes)))?;
                            let at = bad.valid_up_to();
                            let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
                            prop_assert_eq!(e.line, Some(line));
                            prop_assert!(e.message.contains("UTF-8"), "{}", e);
                        }
                    },
                }
            }
        }
    }
}
