//! Issue #13: A1111 prompt editing and alternation, through the binaries.
//!
//! - `kiln render` on the tiny model: an edited prompt renders an image that
//!   differs from the same prompt with either text throughout, and editing at
//!   step 0 renders the bytes of the plain prompt.
//! - `kiln prompt --json` shows the schedule: no `[a:b:N]` or `[a|b]` left as
//!   text, and `(style:anime)` as the text `style:anime` at weight 1.1.
//! - `AND` is refused by `kiln prompt` and, naming the field, by batch validation.

use std::path::Path;

use kiln_tests::*;

/// Four items of one seed: plain red, plain blue, edited red→blue after step 2,
/// alternating, and edited at step 0 (blue throughout).
const BATCH: &str = r#"[defaults]
model = "tiny"
width = 64
height = 64
steps = 4
seed = 9
negative_prompt = "blurry"

[[items]]
prompt = "a red lighthouse at night"
[[items]]
prompt = "a blue lighthouse at night"
[[items]]
prompt = "a [red:blue:2] lighthouse at night"
[[items]]
prompt = "a [red|blue] lighthouse at night"
[[items]]
prompt = "a [red:blue:0] lighthouse at night"
"#;

/// The pixels of the image of item `index` in `out`.
fn pixels(out: &Path, index: usize) -> Vec<u8> {
    let prefix = format!("{index:05}-");
    let file = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "png")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("no image {prefix}* in {}", out.display()));
    decode_png(&file).unwrap().pixels
}

#[test]
fn prompt_editing_changes_the_rendered_image() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("editing.toml");
    std::fs::write(&batch, BATCH).unwrap();
    let out = dir.path().join("out");
    let model = format!("tiny={}", tiny_model().display());
    let r = kiln(&[
        "render",
        arg(&batch),
        "--model",
        &model,
        "--out",
        arg(&out),
        "--workers",
        "1",
    ]);
    assert_eq!(r.code, 0, "kiln render: {}\n{}", r.stdout, r.stderr);
    let [red, blue, edited, alternating, at_zero] = [0, 1, 2, 3, 4].map(|i| pixels(&out, i));
    assert_ne!(red, blue, "the two plain prompts rendered alike");
    assert_ne!(edited, red, "[red:blue:2] rendered like the red prompt");
    assert_ne!(edited, blue, "[red:blue:2] rendered like the blue prompt");
    assert_ne!(alternating, red, "[red|blue] rendered like the red prompt");
    assert_ne!(
        alternating, blue,
        "[red|blue] rendered like the blue prompt"
    );
    assert_ne!(alternating, edited);
    assert_eq!(at_zero, blue, "[red:blue:0] is blue from the first step");
}

#[test]
fn kiln_prompt_shows_the_schedule_and_refuses_and() {
    let r = kiln(&[
        "prompt",
        "a [dog:cat:0.5] in a [red|blue] car",
        "--steps",
        "10",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(
        !r.stdout.contains("dog:cat") && !r.stdout.contains("red|blue"),
        "{}",
        r.stdout
    );
    let schedule = v["schedule"].as_array().unwrap();
    let runs: Vec<(u64, u64, &str)> = schedule
        .iter()
        .map(|s| {
            (
                s["first_step"].as_u64().unwrap(),
                s["last_step"].as_u64().unwrap(),
                s["text"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(runs[0], (1, 2, "a dog in a red car"));
    assert_eq!(runs[1], (3, 3, "a dog in a blue car"));
    assert_eq!(runs.last().copied(), Some((10, 10, "a cat in a red car")));
    assert_eq!(runs.iter().map(|r| r.1 - r.0 + 1).sum::<u64>(), 10);
    assert_eq!(schedule[0]["pieces"][0]["text"], "a dog in a red car");
    assert_eq!(schedule[0]["pieces"][0]["weight"], 1.0);

    let r = kiln(&["prompt", "(style:anime)", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["pieces"][0]["text"], "style:anime");
    assert_eq!(v["pieces"][0]["weight"], 1.1);
    assert_eq!(v["schedule"].as_array().map(Vec::len), Some(1));

    let r = kiln(&["prompt", "a cat AND a dog"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("`AND` at character 7"), "{}", r.stderr);
    assert!(r.stderr.contains("not support"), "{}", r.stderr);

    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("and.toml");
    std::fs::write(
        &batch,
        "[defaults]\nmodel = \"tiny\"\n\n[[items]]\nprompt = \"a cat\"\nnegative_prompt = \"blurry AND dark\"\n",
    )
    .unwrap();
    let r = kiln(&["submit", arg(&batch), "--dry-run"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stderr.contains("items[0].negative_prompt: `AND`"),
        "{}",
        r.stderr
    );
}
