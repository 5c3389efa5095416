//! The entry points of kiln's fuzz targets, one function per target, and the
//! checks every outcome must pass.
//!
//! Each target feeds its bytes to one parser of untrusted input and asserts
//! what the stable proptest properties assert (`domain/tests/properties.rs`,
//! `domain/src/batch.rs`, `coordinator/tests/auth_file.rs`): no panic, every
//! refusal one bounded line that names its field, and every accepted input
//! within the limits the rest of kiln relies on. A failed assertion is a
//! crash to libFuzzer, like a panic in the parser itself.

use std::convert::Infallible;
use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use kiln_coordinator::auth::AuthTable;
use kiln_domain::batch::{Batch, BatchError};
use kiln_domain::error::FieldError;
use kiln_domain::image::{MAX_IMAGE_SIDE, check_image, sha256_hex};
use kiln_domain::prompt::{self, Piece};
use kiln_domain::spec::{
    self, Blob, FIELDS, FieldValue, JobSpec, MAX_TASKS_PER_JOB, RecipeFields, SeriesSpec, SweepAxis,
};

/// The batch file's name in errors. Its folder does not exist, so an
/// `init_image` the fuzzer writes never reads a real file (unless absolute).
const FILE: &str = "no-such-dir/fuzz.toml";

/// Longest field error message accepted: values are quoted by
/// `kiln_domain::error::quote`, at most 200 characters each.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Longest batch refusal accepted, file, line and field included.
const MAX_BATCH_ERROR_BYTES: usize = 2048;

/// Checks a field error: it names a field, and its message is short.
fn check_field_error(e: &FieldError) {
    assert!(!e.path.is_empty(), "error without a field: {e:?}");
    assert!(
        e.message.len() < MAX_MESSAGE_BYTES,
        "message of {} bytes at {}: {:.300}",
        e.message.len(),
        e.path,
        e.message
    );
}

/// Checks a batch refusal: one bounded line, starting with the file and the
/// line it is about, a line of the text.
fn check_batch_error(e: &BatchError, text: &[u8]) {
    let shown = e.to_string();
    assert!(!shown.contains(['\n', '\r']), "not one line: {shown:?}");
    assert!(
        shown.len() < MAX_BATCH_ERROR_BYTES,
        "{} bytes: {shown:.300}",
        shown.len()
    );
    assert_eq!(e.file, FILE);
    match e.line {
        Some(line) => {
            let lines = text.split(|b| *b == b'\n').count();
            assert!(
                (1..=lines).contains(&line),
                "line {line} of {lines}: {shown}"
            );
            assert!(shown.starts_with(&format!("{FILE}:{line}: ")), "{shown}");
        }
        None => assert!(shown.starts_with(&format!("{FILE}: ")), "{shown}"),
    }
}

/// Checks what validation accepted: tasks numbered in order within the job
/// limit, each recipe valid with a parsable prompt, every image sent with the
/// job, and every shot after the anchor it waits for.
fn check_items(spec: &JobSpec, items: &[spec::ExpandedItem]) {
    assert!(!items.is_empty());
    assert!(items.len() <= MAX_TASKS_PER_JOB);
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item.index as usize, i);
        if let Err(e) = item.recipe.validate("") {
            panic!("accepted recipe {i} is invalid: {e}: {:?}", item.recipe);
        }
        assert!(item.recipe.seed <= i64::MAX as u64);
        let steps = item.recipe.steps;
        assert!(prompt::prepare(&item.recipe.prompt, steps).is_ok());
        assert!(prompt::prepare(&item.recipe.negative_prompt, steps).is_ok());
        for sha in [&item.recipe.init_image, &item.recipe.mask]
            .into_iter()
            .flatten()
        {
            assert!(
                spec.blobs.iter().any(|b| &b.sha256 == sha),
                "{sha} not sent"
            );
        }
        if let Some(anchor) = item.series.as_ref().and_then(|p| p.depends_on) {
            assert!((anchor as usize) < i, "shot {i} waits for {anchor}");
        }
    }
}

/// Target `batch`: a batch file's bytes, parsed as `kiln submit` reads a
/// file, then validated and expanded as the coordinator would.
pub fn batch(data: &[u8]) {
    match Batch::parse_bytes(FILE, data.to_vec()) {
        Err(e) => {
            check_batch_error(&e, data);
            if std::str::from_utf8(data).is_ok() {
                assert!(e.line.is_some(), "text error without a line: {e}");
            } else {
                assert!(e.message.contains("UTF-8"), "{e}");
            }
        }
        Ok(batch) => match batch.validate() {
            Err(e) => check_batch_error(&e, data),
            Ok(items) => check_items(&batch.spec, &items),
        },
    }
}

/// Target `prompt`: a prompt prepared as a recipe field (tags, `AND`,
/// editing and alternation over a step count from the input's length,
/// weights), and each stage flattened and laid out in encoder chunks of 75
/// tokens (words standing in for tokens).
pub fn prompt(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let steps = (data.len() % 40) as u32 + 1;
    match prompt::parse_field("items[0].prompt", &text, steps) {
        Err(e) => {
            assert_eq!(e.path, "items[0].prompt");
            check_field_error(&e);
            assert!(prompt::prepare(&text, steps).is_err());
        }
        Ok(stages) => {
            assert_eq!(stages.last().map(|s| s.until), Some(steps));
            for stage in &stages {
                let pieces = &stage.pieces;
                assert_eq!(prompt::parse(&stage.text).as_ref(), Ok(pieces));
                for piece in pieces {
                    if let Piece::Text { text, weight } = piece {
                        assert!(!text.is_empty(), "empty piece in {pieces:?}");
                        assert!(weight.is_finite(), "weight {weight} in {pieces:?}");
                    }
                }
                let plain = prompt::plain_text(pieces);
                assert!(plain.len() <= stage.text.len() + pieces.len(), "{plain:?}");
                let Ok(chunks) = prompt::chunk(pieces, 75, words);
                assert!(!chunks.is_empty());
                assert!(chunks.iter().all(|c| c.tokens.len() <= 75));
                let breaks = pieces.iter().filter(|p| matches!(p, Piece::Break)).count();
                let ended = chunks.iter().filter(|c| c.ended_by_break).count();
                assert_eq!(breaks, ended);
            }
        }
    }
}

/// Splits text into words, the tokens of the `prompt` target's chunks.
fn words(text: &str) -> std::result::Result<Vec<String>, Infallible> {
    Ok(text.split_whitespace().map(str::to_string).collect())
}

/// Target `image`: init-image or mask bytes, checked and decoded as the
/// CLI and the coordinator do before accepting a blob.
pub fn image(data: &[u8]) {
    match check_image("items[0].mask", data) {
        Err(e) => {
            assert_eq!(e.path, "items[0].mask");
            check_field_error(&e);
        }
        Ok((w, h)) => {
            assert!((1..=MAX_IMAGE_SIDE).contains(&w), "width {w}");
            assert!((1..=MAX_IMAGE_SIDE).contains(&h), "height {h}");
        }
    }
}

/// Target `auth_file`: the text of a coordinator's `--auth` file. A refusal
/// is one short line naming the entry (or the TOML line) that is wrong.
pub fn auth_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match AuthTable::parse(&text) {
        Err(message) => {
            assert!(!message.is_empty());
            assert!(
                !message.contains(|c: char| c.is_control()),
                "not one line: {message:?}"
            );
            assert!(
                message.len() < MAX_MESSAGE_BYTES,
                "{} bytes: {message:.300}",
                message.len()
            );
        }
        // Accepted: only the absence of a panic is asked of it.
        Ok(_) => {}
    }
}

/// Target `spec`: a job spec built from the bytes, mostly of valid values so
/// that expansion is reached, validated and expanded.
pub fn spec(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((spec, seed_base)) = job_spec(&mut u) else {
        return;
    };
    match spec::validate(&spec, seed_base) {
        Err(e) => check_field_error(&e),
        Ok(items) => check_items(&spec, &items),
    }
}

// ------------------------------------------------------------ spec builder

const MODELS: &[&str] = &["tiny", "sd-1.5", "a_b"];
const PROMPTS: &[&str] = &["a red fox", "(a cat:1.3) BREAK [dog]", "café, 猫", " "];
const SCHEDULERS: &[&str] = &["ddim", "euler", "euler_a", "dpmpp_2m"];
const SIDES: &[u32] = &[64, 128, 512, 2048];
const STEPS: &[u32] = &[1, 4, 20, 500];
const NOTIFY: &[&str] = &[
    "https://studio.example/hooks/kiln",
    "http://127.0.0.1:9/x?y=1",
    "ftp://no.example/",
];

/// A small valid PNG, made once.
fn small_png() -> &'static [u8] {
    static PNG: OnceLock<Vec<u8>> = OnceLock::new();
    PNG.get_or_init(|| {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encoding a PNG in memory");
        out.into_inner()
    })
}

/// Mostly one of `valid`, else any string of the input.
fn text(u: &mut Unstructured<'_>, valid: &[&str]) -> Result<String> {
    if u.ratio(7, 8)? {
        Ok(u.choose(valid)?.to_string())
    } else {
        u.arbitrary()
    }
}

/// Mostly one of `valid`, else any `u32`.
fn small(u: &mut Unstructured<'_>, valid: &[u32]) -> Result<u32> {
    if u.ratio(7, 8)? {
        u.choose(valid).copied()
    } else {
        u.arbitrary()
    }
}

/// Mostly within `lo..=hi`, else any `f64` (NaN and infinities included).
fn float(u: &mut Unstructured<'_>, lo: f64, hi: f64) -> Result<f64> {
    if u.ratio(7, 8)? {
        let step = f64::from(u.int_in_range(0u16..=1000)?) / 1000.0;
        Ok(lo + (hi - lo) * step)
    } else {
        u.arbitrary()
    }
}

/// A sha256 reference: mostly one of the job's blobs, else anything.
fn sha(u: &mut Unstructured<'_>, blobs: &[Blob]) -> Result<String> {
    if !blobs.is_empty() && u.ratio(7, 8)? {
        Ok(u.choose(blobs)?.sha256.clone())
    } else {
        text(
            u,
            &["0000000000000000000000000000000000000000000000000000000000000000"],
        )
    }
}

/// `f` when a coin with `p` in 8 chances of heads says so.
fn maybe<T>(
    u: &mut Unstructured<'_>,
    p: u8,
    f: impl FnOnce(&mut Unstructured<'_>) -> Result<T>,
) -> Result<Option<T>> {
    if u.ratio(p, 8)? {
        f(u).map(Some)
    } else {
        Ok(None)
    }
}

/// Recipe fields, each present now and then.
fn recipe_fields(u: &mut Unstructured<'_>, blobs: &[Blob]) -> Result<RecipeFields> {
    Ok(RecipeFields {
        model: maybe(u, 2, |u| text(u, MODELS))?,
        prompt: maybe(u, 4, |u| text(u, PROMPTS))?,
        negative_prompt: maybe(u, 2, |u| text(u, PROMPTS))?,
        seed: maybe(u, 2, |u| {
            if u.ratio(7, 8)? {
                u.int_in_range(0..=1000)
            } else {
                u.arbitrary()
            }
        })?,
        steps: maybe(u, 2, |u| small(u, STEPS))?,
        guidance: maybe(u, 2, |u| float(u, 0.0, 50.0))?,
        width: maybe(u, 2, |u| small(u, SIDES))?,
        height: maybe(u, 2, |u| small(u, SIDES))?,
        scheduler: maybe(u, 2, |u| text(u, SCHEDULERS))?,
        karras: maybe(u, 1, |u| u.arbitrary())?,
        eta: maybe(u, 1, |u| float(u, 0.0, 1.0))?,
        strength: maybe(u, 1, |u| float(u, 0.0, 1.0))?,
        init_image: maybe(u, 1, |u| sha(u, blobs))?,
        mask: maybe(u, 1, |u| sha(u, blobs))?,
        loras: maybe(u, 1, loras)?,
        controlnets: None,
        hires: maybe(u, 1, hires)?,
    })
}

/// A list of up to two LoRAs with weights in and out of range.
fn loras(u: &mut Unstructured<'_>) -> Result<Vec<kiln_domain::extras::LoraRef>> {
    let n = u.int_in_range(0..=2)?;
    (0..n)
        .map(|_| {
            Ok(kiln_domain::extras::LoraRef {
                name: text(u, &["ink", "mira-v3", "a/b", ""])?,
                hash: String::new(),
                unet_weight: float(u, -1.0, 2.0)?,
                te_weight: float(u, -1.0, 2.0)?,
            })
        })
        .collect()
}

/// A hires fix, scale and denoise in and out of range.
fn hires(u: &mut Unstructured<'_>) -> Result<kiln_domain::extras::Hires> {
    Ok(kiln_domain::extras::Hires {
        scale: float(u, 0.5, 5.0)?,
        steps: small(u, STEPS)?,
        denoise: float(u, 0.0, 1.2)?,
        upscaler: *u.choose(kiln_domain::extras::Upscaler::ALL)?,
    })
}

/// A sweep value of the type `field` takes, or now and then of any type.
fn field_value(u: &mut Unstructured<'_>, field: &str, blobs: &[Blob]) -> Result<FieldValue> {
    if u.ratio(1, 16)? {
        return Ok(match u.int_in_range(0..=3)? {
            0 => FieldValue::Text(u.arbitrary()?),
            1 => FieldValue::Integer(u.arbitrary()?),
            2 => FieldValue::Number(u.arbitrary()?),
            _ => FieldValue::Flag(u.arbitrary()?),
        });
    }
    Ok(match field {
        "model" => FieldValue::Text(text(u, MODELS)?),
        "prompt" | "negative_prompt" => FieldValue::Text(text(u, PROMPTS)?),
        "scheduler" => FieldValue::Text(text(u, SCHEDULERS)?),
        "init_image" | "mask" => FieldValue::Text(sha(u, blobs)?),
        "seed" => FieldValue::Integer(if u.ratio(7, 8)? {
            u.int_in_range(0..=1000)?
        } else {
            u.arbitrary()?
        }),
        "steps" => FieldValue::Integer(small(u, STEPS)?.into()),
        "width" | "height" => FieldValue::Integer(small(u, SIDES)?.into()),
        "karras" => FieldValue::Flag(u.arbitrary()?),
        "guidance" => FieldValue::Number(float(u, 0.0, 50.0)?),
        "loras" => FieldValue::Loras(loras(u)?),
        "hires" => FieldValue::Hires(hires(u)?),
        _ => FieldValue::Number(float(u, 0.0, 1.0)?),
    })
}

/// A sweep axis over a known or unknown field, zipped or not, with few values.
fn sweep_axis(u: &mut Unstructured<'_>, blobs: &[Blob]) -> Result<SweepAxis> {
    let field = if u.ratio(7, 8)? {
        u.choose(FIELDS)?.to_string()
    } else {
        text(u, &["colour", "seeds", ""])?
    };
    let n = u.int_in_range(0..=4)?;
    let values = (0..n)
        .map(|_| field_value(u, &field, blobs))
        .collect::<Result<_>>()?;
    let zip = if u.ratio(1, 4)? {
        text(u, &["z", "y"])?
    } else {
        String::new()
    };
    Ok(SweepAxis { field, values, zip })
}

/// A series with or without an anchor or a reference image, a few shots.
fn series_spec(u: &mut Unstructured<'_>, blobs: &[Blob]) -> Result<SeriesSpec> {
    let name = text(u, &["hero", "s-1", "a.b"])?;
    let character = text(u, &["a knight in red armour", "(a cat:1.2)"])?;
    let defaults = recipe_fields(u, blobs)?;
    let anchor = u.arbitrary()?;
    let consistency = maybe(u, 2, |u| float(u, 0.0, 1.0))?;
    let reference_image = maybe(u, 1, |u| sha(u, blobs))?;
    let n = u.int_in_range(0..=3)?;
    let shots = (0..n)
        .map(|_| recipe_fields(u, blobs))
        .collect::<Result<_>>()?;
    Ok(SeriesSpec {
        name,
        character,
        defaults,
        anchor,
        consistency,
        reference_image,
        shots,
    })
}

/// A blob: mostly the small PNG, else bytes of the input with their hash,
/// or a wrong hash.
fn blob(u: &mut Unstructured<'_>) -> Result<Blob> {
    Ok(match u.int_in_range(0..=7)? {
        0 => Blob::new(u.arbitrary::<Vec<u8>>()?),
        1 => Blob {
            sha256: text(u, &[&sha256_hex(small_png())])?,
            data: u.arbitrary()?,
        },
        _ => Blob::new(small_png().to_vec()),
    })
}

/// A whole job spec and a seed base: few axes, items, series and blobs, so
/// that expansion stays small.
fn job_spec(u: &mut Unstructured<'_>) -> Result<(JobSpec, u64)> {
    let blobs = (0..u.int_in_range(0..=2)?)
        .map(|_| blob(u))
        .collect::<Result<Vec<_>>>()?;
    let mut defaults = recipe_fields(u, &blobs)?;
    if u.ratio(7, 8)? {
        defaults.model.get_or_insert(text(u, MODELS)?);
    }
    if u.ratio(6, 8)? {
        defaults.prompt.get_or_insert(text(u, PROMPTS)?);
    }
    let sweep = (0..u.int_in_range(0..=3)?)
        .map(|_| sweep_axis(u, &blobs))
        .collect::<Result<_>>()?;
    let items = (0..u.int_in_range(0..=3)?)
        .map(|_| recipe_fields(u, &blobs))
        .collect::<Result<_>>()?;
    let series = (0..u.int_in_range(0..=2)?)
        .map(|_| series_spec(u, &blobs))
        .collect::<Result<_>>()?;
    let notify = (0..u.int_in_range(0..=2)?)
        .map(|_| text(u, NOTIFY))
        .collect::<Result<_>>()?;
    let spec = JobSpec {
        name: text(u, &["job", "", "shots.toml"])?,
        project: text(u, &["", "studio-a", "default"])?,
        priority: u.arbitrary()?,
        defaults,
        sweep,
        items,
        blobs,
        series,
        notify,
    };
    Ok((spec, u.arbitrary()?))
}
