//! Batch-file tests of the extras (`loras`, `controlnets`, `hires`): every place
//! a recipe field may be written, `<lora:...>` tags, and refusals by file, line
//! and field.

use crate::batch::{Batch, BatchError};
use crate::extras::{Preprocessor, ResizeMode, Upscaler};

/// A folder with `pose.png` and the batch file's path in it.
fn folder() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_pixel(16, 16, image::Rgb([255, 255, 255]));
    std::fs::create_dir(dir.path().join("poses")).unwrap();
    img.save(dir.path().join("poses/run.png")).unwrap();
    let file = dir.path().join("b.toml").to_str().unwrap().to_string();
    (dir, file)
}

fn error_in(file: &str, text: &str) -> BatchError {
    match Batch::parse(file, text) {
        Err(e) => e,
        Ok(b) => b.validate().expect_err("the batch must be refused"),
    }
}

const BASE: &str = "[defaults]\nmodel = \"tiny\"\nwidth = 64\nheight = 64\nsteps = 4\n";

#[test]
fn extras_are_read_in_defaults_items_and_with_their_defaults() {
    let (_dir, file) = folder();
    let text = format!(
        "{BASE}loras = [{{ name = \"mira-v3\", weight = 0.8 }}]\n\
         hires = {{ scale = 2.0, steps = 10, denoise = 0.5, upscaler = \"lanczos\" }}\n\
         [[items]]\nprompt = \"a knight\"\n\
         controlnets = [{{ model = \"pose\", image = \"poses/run.png\" }}, {{ model = \"edge\", image = \"poses/run.png\", scale = 0.5, start = 0.1, end = 0.9, resize = \"fill\", preprocess = \"canny\" }}]\n\
         [[items]]\nprompt = \"<lora:ink:0.5:0.25> a harbour\"\n\
         loras = [{{ name = \"mira-v3\", unet_weight = 0.3, te_weight = 0.2 }}, {{ name = \"ink\", weight = 1.0 }}]\n"
    );
    let batch = Batch::parse(&file, &text).unwrap();
    assert_eq!(batch.spec.blobs.len(), 1, "the control image is one blob");
    let items = batch.validate().unwrap();
    let a = &items[0].recipe.extras;
    assert_eq!(a.loras.len(), 1);
    assert_eq!((a.loras[0].unet_weight, a.loras[0].te_weight), (0.8, 0.8));
    let hires = a.hires.as_ref().unwrap();
    assert_eq!((hires.scale, hires.steps, hires.denoise), (2.0, 10, 0.5));
    assert_eq!(hires.upscaler, Upscaler::Lanczos);
    assert_eq!(items[0].recipe.output_size(), (128, 128));
    let c = &a.controlnets;
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].image, batch.spec.blobs[0].sha256);
    assert_eq!(
        (
            c[0].scale,
            c[0].start,
            c[0].end,
            c[0].resize,
            c[0].preprocess
        ),
        (1.0, 0.0, 1.0, ResizeMode::Crop, None)
    );
    assert_eq!(
        (
            c[1].scale,
            c[1].start,
            c[1].end,
            c[1].resize,
            c[1].preprocess
        ),
        (0.5, 0.1, 0.9, ResizeMode::Fill, Some(Preprocessor::Canny))
    );
    // The item's list replaces the defaults'; the tag wins over the listed weight.
    let b = &items[1].recipe;
    assert_eq!(
        b.prompt, "<lora:ink:0.5:0.25> a harbour",
        "the prompt keeps its text"
    );
    let names: Vec<_> = b.extras.loras.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["mira-v3", "ink"]);
    assert_eq!(
        (b.extras.loras[0].unet_weight, b.extras.loras[0].te_weight),
        (0.3, 0.2)
    );
    assert_eq!(
        (b.extras.loras[1].unet_weight, b.extras.loras[1].te_weight),
        (0.5, 0.25)
    );
    assert!(b.extras.controlnets.is_empty());
    assert_ne!(items[0].recipe.batch_key(), b.batch_key());
}

#[test]
fn extras_sweep_and_series_with_per_shot_controlnets() {
    let (_dir, file) = folder();
    let text = format!(
        "{BASE}[sweep]\nprompt = [\"a\"]\nseed = [1, 2]\nloras = [[], [{{ name = \"inkwash\", weight = 0.7 }}]]\n\
         hires = [{{ scale = 1.5, steps = 3 }}]\n\
         [series.knight]\ncharacter = \"a knight\"\nseed = 31\nanchor = true\n\
         loras = [{{ name = \"knight\" }}]\n\
         [[series.knight.shots]]\nprompt = \"walking\"\n\
         controlnets = [{{ model = \"pose\", image = \"poses/run.png\", scale = 0.9 }}]\n\
         [[series.knight.shots]]\nprompt = \"running\"\n"
    );
    let items = Batch::parse(&file, &text).unwrap().validate().unwrap();
    assert_eq!(items.len(), 4 + 3);
    assert!(items[0].recipe.extras.loras.is_empty());
    assert_eq!(items[1].recipe.extras.loras[0].name, "inkwash");
    assert_eq!(items[1].recipe.extras.loras[0].unet_weight, 0.7);
    assert!(
        items[..4]
            .iter()
            .all(|i| i.recipe.extras.hires.as_ref().unwrap().denoise
                == crate::extras::DEFAULT_HIRES_DENOISE)
    );
    assert_eq!(items[0].recipe.output_size(), (96, 96));
    let anchor = &items[4].recipe;
    assert_eq!(anchor.extras.loras[0].name, "knight");
    assert!(anchor.extras.controlnets.is_empty());
    assert_eq!(items[5].recipe.extras.controlnets[0].scale, 0.9);
    assert_eq!(items[5].recipe.extras.loras[0].name, "knight");
    assert!(items[6].recipe.extras.controlnets.is_empty());
    // Different control images or none: different recipes, different batches.
    assert_ne!(items[5].recipe.hash(), items[6].recipe.hash());
}

#[test]
fn recipes_without_extras_keep_their_batch_key_text() {
    let items = Batch::parse("b.toml", &format!("{BASE}[[items]]\nprompt = \"x\"\n"))
        .unwrap()
        .validate()
        .unwrap();
    let key = items[0].recipe.batch_key().to_string();
    assert!(key.ends_with("|txt2img|0"), "{key}");
}

#[test]
fn bad_extras_are_refused_by_file_line_and_field() {
    let (_dir, file) = folder();
    let cases: &[(&str, usize, &str, &str)] = &[
        (
            "[[items]]\nprompt = \"x\"\nloras = [{ name = \"a/b\", weight = 0.8 }]\n",
            8,
            "items[0].loras[0].name",
            "a/b",
        ),
        (
            "[[items]]\nprompt = \"x\"\nloras = [{ name = \"ink\", weight = nan }]\n",
            8,
            "items[0].loras[0].unet_weight",
            "finite",
        ),
        (
            "[[items]]\nprompt = \"x\"\nloras = [{ weight = 0.8 }]\n",
            8,
            "items[0].loras[0].name",
            "missing",
        ),
        (
            "[[items]]\nprompt = \"x\"\nloras = [{ name = \"ink\", wieght = 0.8 }]\n",
            8,
            "items[0].loras[0].wieght",
            "unet_weight",
        ),
        (
            "[[items]]\nprompt = \"x\"\nloras = { name = \"ink\" }\n",
            8,
            "items[0].loras",
            "list of tables",
        ),
        (
            "[[items]]\nprompt = \"x\"\nloras = [{ name = \"ink\" }, { name = \"ink\" }]\n",
            8,
            "items[0].loras[1].name",
            "twice",
        ),
        (
            "[[items]]\nprompt = \"<lora:ink:heavy> x\"\n",
            7,
            "items[0].prompt",
            "heavy",
        ),
        (
            "[[items]]\nprompt = \"x\"\n\ncontrolnets = [{ model = \"pose\", image = \"poses/run.png\", scale = 3.0 }]\n",
            9,
            "items[0].controlnets[0].scale",
            "between 0 and 2",
        ),
        (
            "[[items]]\nprompt = \"x\"\ncontrolnets = [{ model = \"pose\", image = \"poses/run.png\", start = 0.8, end = 0.2 }]\n",
            8,
            "items[0].controlnets[0].end",
            "after start",
        ),
        (
            "[[items]]\nprompt = \"x\"\ncontrolnets = [{ model = \"pose\", image = \"poses/walk.png\" }]\n",
            8,
            "items[0].controlnets[0].image",
            "walk.png",
        ),
        (
            "[[items]]\nprompt = \"x\"\ncontrolnets = [{ model = \"pose\", image = \"poses/run.png\", resize = \"zoom\" }]\n",
            8,
            "items[0].controlnets[0].resize",
            "crop, fill, stretch",
        ),
        (
            "[[items]]\nprompt = \"x\"\ncontrolnets = [{ model = \"pose\", image = \"poses/run.png\", preprocess = \"depth\" }]\n",
            8,
            "items[0].controlnets[0].preprocess",
            "canny",
        ),
        (
            "[[items]]\nprompt = \"x\"\ncontrolnets = [{ image = \"poses/run.png\" }]\n",
            8,
            "items[0].controlnets[0].model",
            "missing",
        ),
        (
            "[[items]]\nprompt = \"x\"\nhires = { scale = 1.0, steps = 10 }\n",
            8,
            "items[0].hires.scale",
            "more than 1",
        ),
        (
            "[[items]]\nprompt = \"x\"\nwidth = 1536\nhires = { scale = 2.0, steps = 10 }\n",
            9,
            "items[0].hires.scale",
            "3072x128",
        ),
        (
            "[[items]]\nprompt = \"x\"\nhires = { scale = 2.0, steps = 10, denoise = 1.5 }\n",
            8,
            "items[0].hires.denoise",
            "between 0 and 1",
        ),
        (
            "[[items]]\nprompt = \"x\"\nhires = { scale = 2.0, steps = 0 }\n",
            8,
            "items[0].hires.steps",
            "between 1 and 500",
        ),
        (
            "[[items]]\nprompt = \"x\"\nhires = { scale = 2.0 }\n",
            8,
            "items[0].hires.steps",
            "missing",
        ),
        (
            "[[items]]\nprompt = \"x\"\nhires = { scale = 2.0, steps = 4, upscaler = \"esrgan\" }\n",
            8,
            "items[0].hires.upscaler",
            "latent, lanczos",
        ),
        (
            "[sweep]\nprompt = [\"x\"]\nloras = [[], [{ name = \"ink\", weight = inf }]]\n",
            8,
            "sweep.loras[1][0].unet_weight",
            "finite",
        ),
        (
            "[sweep]\nprompt = [\"x\"]\nhires = [\"big\"]\n",
            8,
            "sweep.hires[0]",
            "table",
        ),
        (
            "[series.k]\ncharacter = \"k\"\n[[series.k.shots]]\nprompt = \"x\"\n\ncontrolnets = [{ model = \"pose\", image = \"poses/run.png\", start = -1.0 }]\n",
            11,
            "series.k.shots[0].controlnets[0].start",
            "between 0 and 1",
        ),
    ];
    for (body, line, path, needle) in cases {
        let text = format!("{BASE}{body}");
        let e = error_in(&file, &text);
        assert_eq!(
            (e.line, e.path.as_str()),
            (Some(*line), *path),
            "{body}: {e}"
        );
        assert!(e.message.contains(needle), "{body}: {e}");
        assert!(
            e.to_string()
                .starts_with(&format!("{file}:{line}: {path}: ")),
            "{e}"
        );
    }
    let e = error_in(
        &file,
        &format!("{BASE}loras = [{{ name = \"ink\", weight = inf }}]\n[[items]]\nprompt = \"x\"\n"),
    );
    assert_eq!(
        (e.line, e.path.as_str()),
        (Some(6), "defaults.loras[0].unet_weight")
    );
}
