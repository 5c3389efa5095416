//! Property tests for the parsers of untrusted input in kiln-domain: the
//! prompt parser, the job-spec validation and the image check. Whatever a
//! user or a client sends, these must refuse it with an error that names the
//! field and stays short, never panic, and accept only what renders.
//!
//! Each property runs 256 cases by default, under a second for the set in a
//! debug build; `PROPTEST_CASES=10000 cargo test -p kiln-domain` runs more.

use std::sync::OnceLock;

use kiln_domain::error::FieldError;
use kiln_domain::image::{MAX_IMAGE_SIDE, check_image, sha256_hex};
use kiln_domain::prompt::{BREAK, Piece, parse, parse_field, prepare};
use kiln_domain::spec::{
    Blob, FieldValue, JobSpec, MAX_TASKS_PER_JOB, RecipeFields, SeriesSpec, SweepAxis, validate,
};
use proptest::prelude::*;

/// Longest error message accepted: values are quoted with `quote`, which keeps
/// them to 200 characters, so a message never comes near this.
const MAX_MESSAGE_BYTES: usize = 1024;

/// 256 cases unless `PROPTEST_CASES` asks for another number. Failures are
/// kept as ordinary `#[test]`s below, not in a persistence file.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    config.failure_persistence = None;
    config
}

/// Checks the shape every field error must have.
fn check_error(e: &FieldError) -> Result<(), TestCaseError> {
    prop_assert!(!e.path.is_empty(), "error without a field: {e:?}");
    prop_assert!(
        e.message.len() < MAX_MESSAGE_BYTES,
        "message of {} bytes at {}: {:.300}",
        e.message.len(),
        e.path,
        e.message
    );
    Ok(())
}

// ---------------------------------------------------------------- prompts

/// Prompt text built from the parser's syntax, numbers, words, unicode and
/// control characters, so that brackets, weights, escapes and `BREAK` meet.
fn prompt_text() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        3 => prop::sample::select(vec![
            "(", ")", "[", "]", ":", "\\", " ", "BREAK", " BREAK ", ",", ".", "-", "+", "1.3",
            "0", "2", ".5", "1e3", "abc", "word", "é", "猫", "\u{0}", "\n", "\t", "\u{1b}",
            "\u{200b}", "_", "(a:1.5)", "[b]", "\\(", "\\)", "\\\\",
        ])
        .prop_map(str::to_string),
        1 => "[0-9.:()\\[\\]\\\\ a-zA-Z]{1,4}",
        1 => any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(fragment, 0..24).prop_map(|parts| parts.concat())
}

/// Text with none of the characters the parser treats specially.
fn plain_prompt() -> impl Strategy<Value = String> {
    "[^()\\[\\]\\\\:]{0,40}"
}

/// The text pieces of a parse, ignoring breaks.
fn texts(pieces: &[Piece]) -> Vec<(&str, f64)> {
    pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Text { text, weight } => Some((text.as_str(), *weight)),
            Piece::Break => None,
        })
        .collect()
}

/// Characters the parser keeps whatever the brackets around them: all but
/// brackets and whitespace (which `BREAK` may drop).
fn kept(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '(' | ')' | '[' | ']') && !c.is_whitespace())
        .collect()
}

/// Escapes every bracket and backslash so the parser reads them literally.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if matches!(c, '(' | ')' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

proptest! {
    #![proptest_config(config())]

    /// Any prompt is prepared or refused without a panic; the field error
    /// names the field and stays short; every stage's pieces are its text
    /// parsed, each with text and a finite weight.
    #[test]
    fn prompt_parse_never_panics_and_weights_are_finite(prompt in prompt_text()) {
        match parse_field("items[7].prompt", &prompt, 20) {
            Err(e) => {
                prop_assert_eq!(&e.path, "items[7].prompt");
                check_error(&e)?;
                prop_assert!(prepare(&prompt, 20).is_err());
            }
            Ok(stages) => {
                prop_assert!(!stages.is_empty());
                prop_assert_eq!(stages.last().map(|s| s.until), Some(20));
                for stage in &stages {
                    prop_assert_eq!(parse(&stage.text).ok(), Some(stage.pieces.clone()));
                    let pieces = &stage.pieces;
                    for (text, weight) in texts(pieces) {
                        prop_assert!(!text.is_empty(), "empty piece in {:?}", pieces);
                        prop_assert!(weight.is_finite(), "weight {} in {:?}", weight, pieces);
                    }
                    // Merging leaves no two neighbours of equal weight.
                    for pair in pieces.windows(2) {
                        if let [Piece::Text { weight: a, .. }, Piece::Text { weight: b, .. }] = pair {
                            prop_assert!(a != b, "unmerged neighbours in {:?}", pieces);
                        }
                    }
                }
            }
        }
    }

    /// Without a colon there is no explicit weight: every weight is 1.1 to a
    /// whole power (one factor per bracket around the text), so positive.
    #[test]
    fn prompt_weights_without_colons_are_powers_of_the_bracket_factor(
        prompt in prompt_text().prop_map(|p| p.replace(':', ""))
    ) {
        let pieces = parse(&prompt).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let brackets = prompt.chars().filter(|c| matches!(c, '(' | '[')).count() as f64;
        for (text, weight) in texts(&pieces) {
            prop_assert!(weight > 0.0, "{:?} has weight {}", text, weight);
            let power = weight.ln() / 1.1f64.ln();
            prop_assert!((power - power.round()).abs() < 1e-6, "{:?} has weight {}", text, weight);
            prop_assert!(power.abs() <= brackets + 0.5, "{:?} has weight {}", text, weight);
        }
    }

    /// Brackets change weights, never text: without escapes, colons or
    /// `BREAK`, the pieces hold every other character of the prompt, in order.
    #[test]
    fn prompt_brackets_lose_no_text(
        prompt in prompt_text().prop_map(|p| p.replace([':', '\\'], "").replace(BREAK, "BRAKE"))
    ) {
        prop_assume!(!prompt.contains([':', '\\']) && !prompt.contains(BREAK));
        let pieces = parse(&prompt).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let joined: String = texts(&pieces).iter().map(|(t, _)| *t).collect();
        prop_assert_eq!(kept(&joined), kept(&prompt));
    }

    /// A prompt without syntax characters or `BREAK` is one piece of weight
    /// 1 holding the prompt exactly (none for an empty prompt).
    #[test]
    fn prompt_without_syntax_is_one_plain_piece(prompt in plain_prompt()) {
        prop_assume!(!prompt.contains("BREAK"));
        let pieces = parse(&prompt).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        if prompt.is_empty() {
            prop_assert!(pieces.is_empty());
        } else {
            prop_assert_eq!(pieces, vec![Piece::text(prompt, 1.0)]);
        }
    }

    /// Nested explicit weights multiply, innermost first, into the one
    /// piece's weight; a product that overflows is an error, never infinity.
    #[test]
    fn prompt_nested_weights_multiply_or_are_refused(
        weights in prop::collection::vec(
            prop_oneof![
                "-?[0-9]{1,3}(\\.[0-9]{1,3})?",
                (100usize..320).prop_map(|zeros| format!("1{}", "0".repeat(zeros))),
            ],
            1..5,
        )
    ) {
        let prompt = weights.iter().fold("a".to_string(), |inner, w| format!("({inner}:{w})"));
        let mut expected = Some(1.0f64);
        for w in &weights {
            let factor: f64 = w.parse().map_err(|e| TestCaseError::fail(format!("{w}: {e}")))?;
            expected = expected.map(|p| p * factor).filter(|p| p.is_finite());
        }
        match (parse_field("prompt", &prompt, 20), expected) {
            (Ok(stages), Some(weight)) => {
                prop_assert_eq!(stages.len(), 1);
                prop_assert_eq!(&stages[0].pieces, &vec![Piece::text("a", weight)]);
            }
            (Err(e), None) => {
                prop_assert_eq!(&e.path, "prompt");
                check_error(&e)?;
            }
            (got, want) => {
                return Err(TestCaseError::fail(format!("{prompt:.200}: got {got:?}, expected weight {want:?}")));
            }
        }
    }

    /// Escaping every bracket and backslash makes them text: the parse gives
    /// the original string back as one piece of weight 1.
    #[test]
    fn prompt_escapes_round_trip(
        prompt in prompt_text().prop_map(|p| p.replace(':', "").replace(BREAK, "BRAKE"))
    ) {
        prop_assume!(!prompt.contains(':') && !prompt.contains(BREAK));
        let pieces = parse(&escape(&prompt)).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        if prompt.is_empty() {
            prop_assert!(pieces.is_empty());
        } else {
            prop_assert_eq!(pieces, vec![Piece::text(prompt, 1.0)]);
        }
    }
}

/// A weight glued to a long fragment was quoted whole in the field error,
/// so a 16 KiB prompt gave a 16 KiB message.
#[test]
fn regression_malformed_weight_in_a_long_fragment_is_quoted_short() {
    let prompt = format!("({}:1.2.3)", "a".repeat(10_000));
    let e = parse_field("prompt", &prompt, 20).expect_err("malformed weight");
    assert_eq!(e.path, "prompt");
    assert!(e.message.len() < MAX_MESSAGE_BYTES, "{}", e.message.len());
    assert!(e.message.contains("bytes)"), "{}", e.message);
    let prompt = format!("(a:{})", "1.".repeat(5_000));
    let e = parse_field("prompt", &prompt, 20).expect_err("malformed weight");
    assert!(e.message.len() < MAX_MESSAGE_BYTES, "{}", e.message.len());
}

/// Nested weights each finite multiplied to infinity, which the worker
/// would have scaled embeddings by.
#[test]
fn regression_nested_weights_that_overflow_are_refused() {
    let big = format!("1{}", "0".repeat(200));
    let prompt = format!("(((a:{big})):{big})");
    let e = parse_field("prompt", &prompt, 20).expect_err("overflowing weight");
    assert_eq!(e.path, "prompt");
    let prompt = format!("{}a", "(".repeat(8_000));
    let e = parse_field("prompt", &prompt, 20).expect_err("overflowing weight");
    assert!(e.message.len() < MAX_MESSAGE_BYTES, "{}", e.message.len());
}

// ---------------------------------------------------------------- job specs

/// A small valid PNG, made once.
fn small_png() -> &'static [u8] {
    static PNG: OnceLock<Vec<u8>> = OnceLock::new();
    PNG.get_or_init(|| png(8, 8))
}

/// Encodes a `w`x`h` PNG.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a PNG in memory");
    out.into_inner()
}

/// Strings that are mostly valid for the field `valid` lists, and otherwise
/// empty, `..`, control characters, unicode, malformed weights or huge.
fn text_value(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
    let weird = prop::sample::select(vec![
        String::new(),
        ".".into(),
        "..".into(),
        "../etc".into(),
        "a/b".into(),
        "a\u{0}b".into(),
        "new\nline".into(),
        "\u{1b}[31mred".into(),
        "(word:abc)".into(),
        "(word:1.2.3)".into(),
        format!("({}:1.2.3)", "w".repeat(3_000)),
        "x".repeat(20_000),
        "é".repeat(300),
        "BREAK (a:1.5) [b]".into(),
    ]);
    prop_oneof![
        60 => prop::sample::select(valid).prop_map(str::to_string),
        2 => weird,
        1 => "\\PC{0,12}",
        1 => any::<String>().prop_map(|s| s.chars().take(20).collect()),
    ]
}

/// A sha256 reference: mostly the PNG blob's, else garbage or an unsent image.
fn sha_value() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => Just(sha256_hex(small_png())),
        1 => Just(sha256_hex(b"not an image")),
        1 => Just("0".repeat(64)),
        1 => Just("A".repeat(64)),
        1 => "[0-9a-f]{0,70}",
    ]
}

/// Numbers mostly in `valid`, sometimes out of every range: NaN, infinities,
/// negative zero, the extremes.
fn float_value(valid: std::ops::RangeInclusive<f64>) -> impl Strategy<Value = f64> {
    prop_oneof![
        40 => valid,
        1 => prop::sample::select(vec![
            -1.0,
            -0.0,
            1.0000001,
            50.000001,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
        ]),
        1 => any::<f64>(),
    ]
}

/// Mostly one of `valid`, sometimes an out-of-range or arbitrary `u32`.
fn small_value(valid: &'static [u32]) -> impl Strategy<Value = u32> {
    prop_oneof![
        40 => prop::sample::select(valid),
        1 => prop::sample::select(vec![0u32, 63, 65, 2049, 2056, 501, u32::MAX]),
        1 => any::<u32>(),
    ]
}

/// Seeds, including those above `i64::MAX` that the recipe refuses.
fn seed_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        40 => 0u64..1_000,
        1 => prop::sample::select(vec![i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX]),
        1 => any::<u64>(),
    ]
}

const MODELS: &[&str] = &["tiny", "sd-1.5", "a_b"];
const PROMPTS: &[&str] = &["a red fox", "(a cat:1.3) BREAK [dog]", "café, 猫", " "];
const SCHEDULERS: &[&str] = &["ddim", "euler", "euler_a", "dpmpp_2m", "ddim"];
const SIDES: &[u32] = &[64, 128, 512, 2048];
const STEPS: &[u32] = &[1, 4, 20, 500];

/// Recipe fields with every field optional, valid more often than not.
fn recipe_fields() -> impl Strategy<Value = RecipeFields> {
    let text = (
        prop::option::weighted(0.3, text_value(MODELS)),
        prop::option::weighted(0.5, text_value(PROMPTS)),
        prop::option::weighted(0.2, text_value(PROMPTS)),
        prop::option::weighted(0.2, text_value(SCHEDULERS)),
        prop::option::weighted(0.15, sha_value()),
        prop::option::weighted(0.05, sha_value()),
    );
    let numbers = (
        prop::option::weighted(0.3, seed_value()),
        prop::option::weighted(0.2, small_value(STEPS)),
        prop::option::weighted(0.2, float_value(0.0..=50.0)),
        prop::option::weighted(0.2, small_value(SIDES)),
        prop::option::weighted(0.2, small_value(SIDES)),
        prop::option::weighted(0.05, any::<bool>()),
        prop::option::weighted(0.05, float_value(0.0..=1.0)),
        prop::option::weighted(0.1, float_value(0.0..=1.0)),
    );
    (text, numbers).prop_map(
        |(
            (model, prompt, negative_prompt, scheduler, init_image, mask),
            (seed, steps, guidance, width, height, karras, eta, strength),
        )| RecipeFields {
            model,
            prompt,
            negative_prompt,
            seed,
            steps,
            guidance,
            width,
            height,
            scheduler,
            karras,
            eta,
            strength,
            init_image,
            mask,
            loras: None,
            controlnets: None,
            hires: None,
        },
    )
}

/// A sweep value of the type `field` takes, or sometimes of any type.
fn field_value(field: &str) -> BoxedStrategy<FieldValue> {
    let typed = match field {
        "model" => text_value(MODELS).prop_map(FieldValue::Text).boxed(),
        "prompt" | "negative_prompt" => text_value(PROMPTS).prop_map(FieldValue::Text).boxed(),
        "scheduler" => text_value(SCHEDULERS).prop_map(FieldValue::Text).boxed(),
        "init_image" | "mask" => sha_value().prop_map(FieldValue::Text).boxed(),
        "seed" => prop_oneof![0i64..1_000, any::<i64>()]
            .prop_map(FieldValue::Integer)
            .boxed(),
        "steps" => small_value(STEPS)
            .prop_map(|v| FieldValue::Integer(v.into()))
            .boxed(),
        "width" | "height" => small_value(SIDES)
            .prop_map(|v| FieldValue::Integer(v.into()))
            .boxed(),
        "karras" => any::<bool>().prop_map(FieldValue::Flag).boxed(),
        "guidance" => float_value(0.0..=50.0).prop_map(FieldValue::Number).boxed(),
        _ => float_value(0.0..=1.0).prop_map(FieldValue::Number).boxed(),
    };
    let any_type = prop_oneof![
        text_value(PROMPTS).prop_map(FieldValue::Text),
        any::<i64>().prop_map(FieldValue::Integer),
        float_value(-1.0..=100.0).prop_map(FieldValue::Number),
        any::<bool>().prop_map(FieldValue::Flag),
    ];
    prop_oneof![40 => typed, 1 => any_type].boxed()
}

/// A sweep axis over a known or unknown field, zipped or not, with few
/// values so that expansion stays small; zipped axes may differ in length.
fn sweep_axis() -> impl Strategy<Value = SweepAxis> {
    let field = prop_oneof![
        12 => prop::sample::select(vec!["prompt", "seed", "steps", "guidance", "width", "model"])
            .prop_map(str::to_string),
        2 => prop::sample::select(kiln_domain::spec::FIELDS).prop_map(str::to_string),
        1 => text_value(&["colour", "seeds", ""]),
    ];
    let zip = prop::sample::select(vec!["", "", "", "z"]).prop_map(str::to_string);
    (field, zip).prop_flat_map(|(field, zip)| {
        // Rarely empty: an axis without values is refused before anything else.
        let values = prop::collection::vec(field_value(&field), 1..4);
        (Just(field), values, Just(zip), prop::bool::weighted(0.03)).prop_map(
            |(field, mut values, zip, empty)| {
                if empty {
                    values.clear();
                }
                SweepAxis { field, values, zip }
            },
        )
    })
}

/// A series with or without an anchor or a reference image.
fn series_spec() -> impl Strategy<Value = SeriesSpec> {
    (
        text_value(&["hero", "s-1", "a.b"]),
        text_value(&["a knight in red armour", "(a cat:1.2)"]),
        recipe_fields(),
        any::<bool>(),
        prop::option::weighted(0.3, float_value(0.0..=1.0)),
        prop::option::weighted(0.2, sha_value()),
        prop::collection::vec(recipe_fields(), 0..3),
    )
        .prop_map(
            |(name, character, defaults, anchor, consistency, reference_image, shots)| SeriesSpec {
                name,
                character,
                defaults,
                anchor,
                consistency,
                reference_image,
                shots,
            },
        )
}

/// A blob: mostly a real PNG, else garbage with its right hash, or a wrong hash.
fn blob() -> impl Strategy<Value = Blob> {
    prop_oneof![
        30 => Just(Blob::new(small_png().to_vec())),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Blob::new),
        1 => (sha_value(), prop::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(sha256, data)| Blob { sha256, data }),
    ]
}

/// A whole job spec, small enough to expand in well under a millisecond.
/// The defaults usually name a model, so that many specs are valid and the
/// properties of accepted jobs are tested too.
fn job_spec() -> impl Strategy<Value = JobSpec> {
    let defaults = (
        recipe_fields(),
        prop::option::weighted(0.9, text_value(MODELS)),
        prop::option::weighted(0.7, text_value(PROMPTS)),
    )
        .prop_map(|(mut d, model, prompt)| {
            d.model = d.model.or(model);
            d.prompt = d.prompt.or(prompt);
            d
        });
    (
        (
            text_value(&["job", "", "shots.toml"]),
            text_value(&["", "studio-a", "default"]),
            any::<i32>(),
        ),
        defaults,
        prop::collection::vec(sweep_axis(), 0..3),
        prop::collection::vec(recipe_fields(), 0..4),
        prop::collection::vec(blob(), 0..3),
        prop::collection::vec(series_spec(), 0..2),
        prop::collection::vec(
            text_value(&[
                "https://studio.example/hooks/kiln",
                "http://127.0.0.1:9/x",
                "ftp://studio.example/",
                "https://u:p@h/",
            ]),
            0..3,
        ),
    )
        .prop_map(
            |((name, project, priority), defaults, sweep, items, blobs, series, notify)| JobSpec {
                name,
                project,
                priority,
                defaults,
                sweep,
                items,
                blobs,
                series,
                notify,
            },
        )
}

/// Found by the `spec` fuzz target: a sweep over an unknown field named by
/// 200 control characters was quoted at 200 characters, each escaped to six
/// (`\u{1e}`), and the message grew past a kilobyte.
#[test]
fn regression_a_field_name_of_control_characters_is_quoted_short() {
    let spec = JobSpec {
        defaults: RecipeFields {
            model: Some("tiny".into()),
            prompt: Some("a fox".into()),
            ..Default::default()
        },
        sweep: vec![SweepAxis {
            field: format!("ggg{}", "\u{1e}".repeat(300)),
            values: vec![FieldValue::Integer(1)],
            zip: String::new(),
        }],
        ..Default::default()
    };
    let e = validate(&spec, 0).expect_err("unknown field");
    assert!(
        e.message.starts_with("unknown recipe field"),
        "{}",
        e.message
    );
    assert!(e.message.len() < MAX_MESSAGE_BYTES, "{}", e.message.len());
}

proptest! {
    #![proptest_config(config())]

    /// Validation of any spec returns a named, short error or tasks whose
    /// recipes are each valid, numbered in order, within the job limit.
    #[test]
    fn spec_validation_never_panics_and_accepts_only_valid_recipes(
        spec in job_spec(),
        seed_base in any::<u64>(),
    ) {
        match validate(&spec, seed_base) {
            Err(e) => check_error(&e)?,
            Ok(items) => {
                prop_assert!(!items.is_empty());
                prop_assert!(items.len() <= MAX_TASKS_PER_JOB);
                for (i, item) in items.iter().enumerate() {
                    prop_assert_eq!(item.index as usize, i);
                    if let Err(e) = item.recipe.validate("") {
                        return Err(TestCaseError::fail(format!(
                            "accepted recipe {i} is invalid: {e}: {:?}",
                            item.recipe
                        )));
                    }
                    prop_assert!(item.recipe.seed <= i64::MAX as u64);
                    prop_assert!(parse(&item.recipe.prompt).is_ok());
                    if let Some(sha) = &item.recipe.init_image {
                        prop_assert!(spec.blobs.iter().any(|b| &b.sha256 == sha));
                    }
                    // A shot waits for an anchor rendered before it.
                    if let Some(anchor) = item.series.as_ref().and_then(|p| p.depends_on) {
                        prop_assert!((anchor as usize) < i);
                    }
                }
            }
        }
    }

    /// The same spec and base validate to the same result: seeds derive
    /// from positions, never from chance.
    #[test]
    fn spec_validation_is_deterministic(spec in job_spec(), seed_base in any::<u64>()) {
        prop_assert_eq!(validate(&spec, seed_base), validate(&spec, seed_base));
    }
}

// ---------------------------------------------------------------- images

/// Bytes an attacker or a broken client might send as an image.
fn image_bytes() -> impl Strategy<Value = Vec<u8>> {
    let sig = b"\x89PNG\r\n\x1a\n".to_vec();
    let jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(any::<u8>(), 0..256)
            .prop_map(move |tail| [sig.clone(), tail].concat()),
        prop::collection::vec(any::<u8>(), 0..256)
            .prop_map(move |tail| [jpeg.clone(), tail].concat()),
        (1u32..24, 1u32..24, any::<prop::sample::Index>()).prop_map(|(w, h, cut)| {
            let mut data = png(w, h);
            let len = cut.index(data.len());
            data.truncate(len);
            data
        }),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| {
            let mut data = small_png().to_vec();
            let i = at.index(data.len());
            data[i] ^= byte | 1;
            data
        }),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes are refused with an error naming the field, or measured
    /// within the side limits.
    #[test]
    fn image_check_never_panics_and_names_the_field(data in image_bytes()) {
        match check_image("items[2].init_image", &data) {
            Err(e) => {
                prop_assert_eq!(&e.path, "items[2].init_image");
                check_error(&e)?;
            }
            Ok((w, h)) => {
                prop_assert!((1..=MAX_IMAGE_SIDE).contains(&w));
                prop_assert!((1..=MAX_IMAGE_SIDE).contains(&h));
            }
        }
    }

    /// A real PNG is accepted and measured whatever its size.
    #[test]
    fn image_check_measures_real_pngs(w in 1u32..64, h in 1u32..64) {
        prop_assert_eq!(check_image("mask", &png(w, h)).ok(), Some((w, h)));
    }
}
