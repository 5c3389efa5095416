//! Issue #14: ControlNets and their preprocessors, through the real binaries.
//!
//! - `kiln preprocess canny` on a white square on black finds the square's
//!   border and nothing else.
//! - A series with its own pose per shot (two ControlNets on the last shot)
//!   renders byte-identical images on 1 worker (`kiln render`) and on 3
//!   worker processes behind a coordinator.
//! - A task needing a ControlNet that only one worker holds is rendered there.

use std::collections::BTreeSet;
use std::path::Path;

use kiln_tests::*;

/// Writes a 64 px black PNG with a white square from 16 to 47.
fn square(path: &Path) {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        let inside = (16..=47).contains(&x) && (16..=47).contains(&y);
        image::Rgb(if inside { [255; 3] } else { [0; 3] })
    });
    img.save(path).unwrap();
}

/// Writes a 64 px stick figure (white on black); `variant` spreads its legs.
fn pose(path: &Path, variant: i32) {
    let img = image::RgbImage::from_fn(64, 64, |x, y| {
        let (x, y) = (x as i32, y as i32);
        let v = variant * 6;
        let leg = (y - 60 + (x - 32 + v).abs() * 2).abs() <= 2 && y > 30;
        let body = (x - 32).abs() <= 1 && (10..=40).contains(&y);
        let arm = (y - 22).abs() <= 1 && (16 + v..=48 - v).contains(&x);
        image::Rgb(if leg || body || arm { [255; 3] } else { [0; 3] })
    });
    img.save(path).unwrap();
}

/// Writes the tiny SD 1.5 ControlNet into `dir` and returns `NAME=DIR` for it.
fn tiny_controlnet(dir: &Path, name: &str) -> String {
    let out = kiln(&[
        "model",
        "tiny",
        "--kind",
        "controlnet",
        "--base",
        "sd15",
        "--out",
        arg(dir),
    ]);
    assert_eq!(
        out.code, 0,
        "kiln model tiny --kind controlnet: {}",
        out.stderr
    );
    format!("{name}={}", dir.display())
}

#[test]
fn canny_marks_the_border_of_a_square_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (input, edges) = (dir.path().join("square.png"), dir.path().join("edges.png"));
    square(&input);
    let out = kiln(&["preprocess", "canny", arg(&input), "--out", arg(&edges)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let map = image::open(&edges).unwrap().to_luma8();
    assert_eq!(map.dimensions(), (64, 64));
    let near = |x: i32, y: i32| {
        let d = [x - 16, x - 47, y - 16, y - 47].map(i32::abs);
        d.into_iter().min().unwrap() <= 2 && (13..=50).contains(&x) && (13..=50).contains(&y)
    };
    let on: Vec<(i32, i32)> = map
        .enumerate_pixels()
        .filter(|(_, _, p)| p.0[0] > 127)
        .map(|(x, y, _)| (x as i32, y as i32))
        .collect();
    assert!(on.len() >= 120, "{} edge pixels", on.len());
    let far: Vec<_> = on.iter().filter(|(x, y)| !near(*x, *y)).collect();
    assert!(far.is_empty(), "edges away from the border: {far:?}");
    // Thresholds are flags; the high one above every gradient leaves no edge.
    let none = dir.path().join("none.png");
    let out = kiln(&[
        "preprocess",
        "canny",
        arg(&input),
        "--out",
        arg(&none),
        "--low",
        "2000",
        "--high",
        "3000",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let map = image::open(&none).unwrap().to_luma8();
    assert!(map.pixels().all(|p| p.0[0] == 0));
}

/// The knight series: one pose per shot, two ControlNets on the last one
/// (the second from a raw picture through canny).
const KNIGHT: &str = r#"
[series.knight]
model = "tiny"
character = "a knight in silver armour with a red plume"
seed = 31
width = 64
height = 64
steps = 4
anchor = true
consistency = 0.5
[[series.knight.shots]]
prompt = "walking"
controlnets = [{ model = "pose", image = "pose0.png", scale = 0.9 }]
[[series.knight.shots]]
prompt = "running"
controlnets = [{ model = "pose", image = "pose1.png", scale = 1.0, start = 0.0, end = 0.8 }]
[[series.knight.shots]]
prompt = "jumping"
controlnets = [{ model = "pose", image = "pose2.png", scale = 0.8 }, { model = "pose", image = "square.png", scale = 0.4, preprocess = "canny" }]
"#;

#[test]
fn a_series_with_a_pose_per_shot_renders_the_same_on_one_and_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = format!("tiny={}", tiny_model().display());
    let cn = tiny_controlnet(&d.join("cn"), "pose");
    for i in 0..3 {
        pose(&d.join(format!("pose{i}.png")), i);
    }
    square(&d.join("square.png"));
    let batch = d.join("knight.toml");
    std::fs::write(&batch, KNIGHT).unwrap();

    let one = d.join("one");
    let r = kiln(&[
        "render",
        arg(&batch),
        "--model",
        &model,
        "--controlnet",
        &cn,
        "--out",
        arg(&one),
        "--workers",
        "1",
    ]);
    assert_eq!(r.code, 0, "kiln render: {}\n{}", r.stdout, r.stderr);

    let farm = d.join("farm");
    std::fs::create_dir(&farm).unwrap();
    let c = Coordinator::start(&farm, &[]).unwrap();
    let _workers: Vec<Proc> = (1..=3)
        .map(|i| {
            worker(
                &farm,
                &c.url,
                &format!("w{i}"),
                &["--model", &model, "--controlnet", &cn],
            )
            .unwrap()
        })
        .collect();
    wait_for_workers(&c.url, 3);
    let job = submit_text(d, &c.url, "knight.toml", KNIGHT);
    watch_ok(&c.url, &job);
    let three = d.join("three");
    let r = kiln(&["fetch", &job, "--out", arg(&three), "--coordinator", &c.url]);
    assert_eq!(r.code, 0, "fetch: {}", r.stderr);

    let (a, b) = (pngs(&one), pngs(&three));
    assert_eq!(a.len(), 4, "anchor + 3 shots: {a:?}");
    let names = |v: &[std::path::PathBuf]| -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&a), names(&b));
    let mut distinct = BTreeSet::new();
    for (x, y) in a.iter().zip(&b) {
        let bytes = std::fs::read(x).unwrap();
        assert_eq!(bytes, std::fs::read(y).unwrap(), "{} differs", x.display());
        assert_eq!(decode_png(x).unwrap().width, 64);
        distinct.insert(bytes);
    }
    assert_eq!(distinct.len(), 4, "every shot its own picture");
    // The last shot's PNG carries A1111's lines for both of its ControlNets.
    let last = String::from_utf8_lossy(&std::fs::read(&a[3]).unwrap()).into_owned();
    assert!(
        last.contains("ControlNet 0") && last.contains("ControlNet 1"),
        "{}",
        a[3].display()
    );
}

#[test]
fn a_task_needing_a_controlnet_goes_to_the_worker_that_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = format!("tiny={}", tiny_model().display());
    let cn = tiny_controlnet(&d.join("cn"), "pose");
    pose(&d.join("pose0.png"), 0);
    let c = Coordinator::start(d, &[]).unwrap();
    let _plain: Vec<Proc> = ["plain-1", "plain-2"]
        .iter()
        .map(|id| worker(d, &c.url, id, &["--model", &model]).unwrap())
        .collect();
    let _holder = worker(
        d,
        &c.url,
        "holder",
        &["--model", &model, "--controlnet", &cn],
    )
    .unwrap();
    wait_for_workers(&c.url, 3);
    let text = r#"
[defaults]
model = "tiny"
width = 64
height = 64
steps = 2
prompt = "a knight"
controlnets = [{ model = "pose", image = "pose0.png" }]
[sweep]
seed = [1, 2, 3, 4]
"#;
    let job = submit_text(d, &c.url, "posed.toml", text);
    watch_ok(&c.url, &job);
    let rendered_by: BTreeSet<String> = get_job(&c.url, &job)
        .tasks
        .iter()
        .flat_map(|t| t.attempts.iter().map(|a| a.worker_id.clone()))
        .collect();
    assert_eq!(rendered_by, BTreeSet::from(["holder".to_string()]));
}
