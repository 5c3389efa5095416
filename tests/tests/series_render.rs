//! Issue #5: series rendered by real `candle` workers on the tiny model.
//!
//! - The MIRA series renders an anchor, three shots and a contact sheet, and
//!   the same bytes on 1 worker (`kiln render`, the in-process farm) and on 3
//!   worker processes behind a `kiln-coordinator` (a fresh result store).
//! - With f32 and f16 workers (two determinism classes) on one coordinator,
//!   every task of a series is rendered by workers of a single class.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_tests::*;

/// Where `kiln fetch` and `kiln render` put a series' contact sheet.
const SHEET: &str = "mira/contact-sheet.png";

fn fetch(url: &str, job: &str, out: &Path) {
    let r = kiln(&["fetch", job, "--out", arg(out), "--coordinator", url]);
    assert_eq!(r.code, 0, "fetch {job}: {}", r.stderr);
}

/// Every file under `root`, by path relative to it (with `/` separators).
fn files_under(root: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                let rel: Vec<&str> = rel.iter().map(|c| c.to_str().unwrap()).collect();
                out.insert(rel.join("/"), path);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Checks a fetched MIRA folder: 4 PNGs of 64x64 (anchor first, then shots
/// 1..=3), all different, each as the manifest says, and a larger contact
/// sheet. Returns the manifest lines.
fn assert_mira_folder(out: &Path) -> Vec<serde_json::Value> {
    let files = pngs(out);
    assert_eq!(files.len(), 4, "anchor + 3 shots: {files:?}");
    let lines = manifest(out).unwrap();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let mut distinct = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], i);
        assert_eq!(line["status"], "completed", "{line}");
        assert_eq!(line["series"], "mira", "{line}");
        assert_eq!(line["shot"], i, "{line}");
        let file = out.join(line["file"].as_str().unwrap());
        assert_eq!(
            sha256_file(&file).unwrap(),
            line["sha256"].as_str().unwrap(),
            "{}",
            file.display()
        );
        let png = decode_png(&file).unwrap();
        assert_eq!((png.width, png.height), (64, 64), "{}", file.display());
        distinct.insert(std::fs::read(&file).unwrap());
    }
    assert_eq!(distinct.len(), 4, "the anchor and the 3 shots must differ");
    for shot in &lines[1..] {
        assert_eq!(
            shot["recipe"]["init_image"], lines[0]["sha256"],
            "shots start from the anchor: {shot}"
        );
    }
    let sheet = decode_png(&out.join(SHEET)).unwrap();
    assert!(
        sheet.width > 64 && sheet.height > 64,
        "contact sheet is {}x{}",
        sheet.width,
        sheet.height
    );
    lines
}

/// The series above renders 1 anchor + 3 shots and a contact sheet; rendering
/// it again into a fresh result store on a different number of workers gives
/// byte-identical files.
#[test]
fn a_series_renders_the_same_bytes_on_one_worker_and_on_three() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = format!("tiny={}", tiny_model().display());
    let batch = d.join("mira.toml");
    std::fs::write(&batch, MIRA).unwrap();

    // One in-process worker, in-memory result store.
    let one = d.join("one-worker");
    let r = kiln(&[
        "render",
        arg(&batch),
        "--model",
        &model,
        "--out",
        arg(&one),
        "--workers",
        "1",
    ]);
    assert_eq!(r.code, 0, "kiln render: {}\n{}", r.stdout, r.stderr);

    // Three worker processes behind a coordinator with its own result folder.
    let farm = d.join("farm");
    std::fs::create_dir(&farm).unwrap();
    let c = Coordinator::start(&farm, &[]).unwrap();
    let _workers: Vec<Proc> = (1..=3)
        .map(|i| worker(&farm, &c.url, &format!("w{i}"), &["--model", &model]).unwrap())
        .collect();
    wait_for_workers(&c.url, 3);
    let job = submit_text(d, &c.url, "mira.toml", MIRA);
    watch_ok(&c.url, &job);
    let three = d.join("three-workers");
    fetch(&c.url, &job, &three);
    let rendered_by: BTreeSet<String> = get_job(&c.url, &job)
        .tasks
        .iter()
        .flat_map(|t| t.attempts.iter().map(|a| a.worker_id.clone()))
        .collect();
    eprintln!("the 3-worker farm rendered the series on {rendered_by:?}");

    let (a, b) = (assert_mira_folder(&one), assert_mira_folder(&three));

    // Every file, matched by relative path, is byte-identical.
    let (files_a, files_b) = (files_under(&one), files_under(&three));
    assert_eq!(
        files_a.keys().collect::<Vec<_>>(),
        files_b.keys().collect::<Vec<_>>(),
        "the two runs wrote different files"
    );
    assert!(files_a.contains_key(SHEET), "{:?}", files_a.keys());
    for (rel, path) in &files_a {
        if rel == "manifest.jsonl" {
            continue; // job ids, workers and timings differ: compared below
        }
        assert_eq!(
            std::fs::read(path).unwrap(),
            std::fs::read(&files_b[rel]).unwrap(),
            "{rel} differs between 1 and 3 workers"
        );
    }
    for (x, y) in a.iter().zip(&b) {
        for field in [
            "index",
            "file",
            "sha256",
            "size",
            "recipe_hash",
            "seed",
            "model_hash",
            "determinism_class",
            "series",
            "shot",
        ] {
            assert_eq!(x[field], y[field], "manifest field {field}: {x}\n{y}");
        }
    }
    // The coordinator's own result folder holds the same contact sheet.
    assert_eq!(
        std::fs::read(c.results.join(&job).join(SHEET)).unwrap(),
        std::fs::read(one.join(SHEET)).unwrap(),
        "the result store's contact sheet"
    );
}

/// Two worker classes (f32 and f16 CPU workers) and one series: every shot of
/// the series comes from one class.
#[test]
fn every_task_of_a_series_is_rendered_by_one_determinism_class() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = format!("tiny={}", tiny_model().display());
    let c = Coordinator::start(d, &[]).unwrap();
    let ids = ["f32-a", "f32-b", "f16-a", "f16-b"];
    let workers: Vec<Proc> = ids
        .iter()
        .map(|id| {
            let dtype = &id[..3];
            worker(d, &c.url, id, &["--model", &model, "--dtype", dtype]).unwrap()
        })
        .collect();
    wait_for_workers(&c.url, ids.len());

    // Each worker's class as the coordinator knows it.
    let listed = kiln(&["workers", "--json", "--coordinator", &c.url]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let class_of: BTreeMap<String, String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_str().unwrap().to_string(),
                w["determinism_class"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        class_of.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        ids.into_iter().collect(),
        "{class_of:?}"
    );
    for (id, class) in &class_of {
        let dtype = &id[..3];
        assert!(class.contains(&format!("/{dtype}/")), "{id}: {class}");
    }
    let classes: BTreeSet<&String> = class_of.values().collect();
    assert_eq!(classes.len(), 2, "two determinism classes: {class_of:?}");

    // The series alone: when its anchor completes, idle workers of both
    // classes ask for its three shots.
    let series = submit_text(d, &c.url, "mira.toml", MIRA);
    watch_ok(&c.url, &series);

    let tasks = get_job(&c.url, &series).tasks;
    assert_eq!(tasks.len(), 4);
    let mut series_classes = BTreeSet::new();
    for t in &tasks {
        assert!(!t.attempts.is_empty(), "task {} never ran", t.index);
        for a in &t.attempts {
            let class = class_of
                .get(&a.worker_id)
                .unwrap_or_else(|| panic!("unknown worker {:?}", a.worker_id));
            series_classes.insert(class.clone());
        }
    }
    assert_eq!(
        series_classes.len(),
        1,
        "the series was rendered on several classes: {:?}",
        tasks
            .iter()
            .map(|t| (
                t.index,
                t.attempts
                    .iter()
                    .map(|a| a.worker_id.clone())
                    .collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
    );
    let series_class = series_classes.pop_first().unwrap();

    let out = d.join("series");
    fetch(&c.url, &series, &out);
    let lines = manifest(&out).unwrap();
    assert_eq!(lines.len(), 4);
    for line in &lines {
        assert_eq!(line["status"], "completed", "{line}");
        assert_eq!(line["determinism_class"], series_class.as_str(), "{line}");
    }
    assert_eq!(pngs(&out).len(), 4);
    decode_png(&out.join(SHEET)).unwrap();

    // The other class could render all along: with the series' class gone, a
    // plain job completes on it.
    let mut kept = Vec::new();
    for (proc, id) in workers.into_iter().zip(ids) {
        if class_of[id] != series_class {
            kept.push(proc);
        }
        // A worker of the series' class is dropped here: killed.
    }
    assert_eq!(kept.len(), 2, "two workers of the other class remain");
    let plain_file = d.join("plain.toml");
    sweep_file(&plain_file, "tiny", 2, 4, 6).unwrap();
    let plain = job_id(
        &kiln(&[
            "submit",
            arg(&plain_file),
            "--json",
            "--coordinator",
            &c.url,
        ])
        .stdout,
    )
    .unwrap();
    watch_ok(&c.url, &plain);
    let plain_out = d.join("plain");
    assert_exactly_once(&c.url, &plain, &plain_out, 8);
    for line in manifest(&plain_out).unwrap() {
        assert_ne!(line["determinism_class"], series_class.as_str(), "{line}");
    }
}
