//! Prompt editing and alternation, end to end on the tiny model: the
//! conditioning changes at the web UI's steps, each distinct text is encoded
//! once, and the edge cases render like the plain prompts they amount to.

use candle_core::Device;

use super::tests::{TestResult, recipe, render, tiny};
use super::*;

#[test]
fn an_edited_prompt_changes_the_image() -> TestResult {
    let p = tiny();
    let red = render(p, &recipe("a red castle on a hill", 5))?;
    let blue = render(p, &recipe("a blue castle on a hill", 5))?;
    for edited in [
        "a [red:blue:2] castle on a hill",
        "a [red:blue:0.5] castle on a hill",
        "a [red|blue] castle on a hill",
        "a (red [castle:tower:1]:1.2) on a hill",
    ] {
        let image = render(p, &recipe(edited, 5))?;
        assert!(
            image != red && image != blue,
            "{edited:?} rendered like a plain prompt"
        );
    }
    // The negative prompt is edited too.
    let mut r = recipe("a red castle on a hill", 5);
    r.negative_prompt = "[blurry:dark:2]".into();
    let edited = render(p, &r)?;
    r.negative_prompt = "blurry".into();
    let plain = render(p, &r)?;
    assert!(edited != plain, "negative prompt editing changed nothing");
    Ok(())
}

#[test]
fn editing_at_the_ends_renders_the_plain_prompt() -> TestResult {
    let p = tiny();
    let red = render(p, &recipe("a red castle", 6))?;
    let blue = render(p, &recipe("a blue castle", 6))?;
    // The recipe has 4 steps: `when` 0 (or below) is `to` throughout, 4 and
    // more (or the fraction 1.0) is `from` throughout.
    for (edited, want, label) in [
        ("a [red:blue:0] castle", &blue, "blue"),
        ("a [red:blue:0.0] castle", &blue, "blue"),
        ("a [red:blue:-3] castle", &blue, "blue"),
        ("a [red:blue:4] castle", &red, "red"),
        ("a [red:blue:9] castle", &red, "red"),
        ("a [red:blue:1.0] castle", &red, "red"),
        ("a [red|red] castle", &red, "red"),
        ("a <lora:mira:0.8>red castle", &red, "red"),
    ] {
        let image = render(p, &recipe(edited, 6))?;
        assert!(
            image == *want,
            "{edited:?} differs from the plain {label} prompt"
        );
    }
    Ok(())
}

#[test]
fn the_conditioning_changes_at_the_web_uis_steps() -> TestResult {
    let p = tiny();
    let rows = |prompt: &str,
                negative: Option<&str>,
                steps: u32|
     -> Result<Vec<Vec<usize>>, PipelineError> {
        let s =
            p.scheduled_conditioning(prompt, negative, steps, (8, 8), None, &Default::default())?;
        Ok((0..steps).map(|c| s.rows_at(c)).collect())
    };
    // Rows: the negative prompt first, then the prompt's distinct texts.
    assert_eq!(
        rows("a [x:y:2] z", Some(""), 4)?,
        [vec![0, 1], vec![0, 1], vec![0, 1], vec![0, 2]]
    );
    assert_eq!(
        rows("[x|y]", Some("n"), 5)?,
        [vec![0, 1], vec![0, 1], vec![0, 2], vec![0, 1], vec![0, 2]]
    );
    assert_eq!(
        rows("p", Some("[n:m:0.5]"), 4)?,
        [vec![0, 2], vec![0, 2], vec![0, 2], vec![1, 2]]
    );
    assert_eq!(rows("[x:y:1]", None, 3)?, [vec![0], vec![0], vec![1]]);
    let plain = p.scheduled_conditioning(
        "a castle",
        Some("blurry"),
        30,
        (8, 8),
        None,
        &Default::default(),
    )?;
    assert!(!plain.changes());
    assert_eq!(plain.rows_at(29), [0, 1]);
    Ok(())
}

#[test]
fn each_distinct_text_is_encoded_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let p = Pipeline::load(dir.path(), &Device::Cpu)?;
    // Ten steps alternate between two texts; with the negative prompt, three windows.
    let mut r = recipe("a [red|blue] castle", 1);
    r.steps = 10;
    p.txt2img(&r, &mut |_, _| true)?;
    let (_, misses, entries) = p.text.cache_stats();
    assert_eq!((misses, entries), (3, 3));
    // The same texts again: nothing new is encoded.
    r.prompt = "a [blue|red] castle".into();
    p.txt2img(&r, &mut |_, _| true)?;
    assert_eq!(p.text.cache_stats().1, 3);
    Ok(())
}

#[test]
fn and_is_refused_as_an_invalid_recipe() {
    let err = render(tiny(), &recipe("a cat AND a dog", 1)).err();
    assert!(
        matches!(&err, Some(PipelineError::InvalidRecipe { field: "prompt", message }) if message.contains("AND")),
        "{err:?}"
    );
}
