//! The user-facing tools of issue #3, run as a user runs them: `kiln prompt`,
//! `kiln inspect`, prompt validation in batch files, and the worker's
//! `--memory-budget` and `--device` flags.

use std::time::Duration;

use kiln_tests::*;

#[test]
fn prompt_shows_weighted_spans_and_refuses_a_malformed_weight() {
    let ok = kiln(&["prompt", "a (red car:1.3) here BREAK [blue sky]"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("1.3  \"red car\""), "{}", ok.stdout);
    assert!(ok.stdout.contains("BREAK"), "{}", ok.stdout);
    assert!(ok.stdout.contains("chunk 2"), "{}", ok.stdout);

    let bad = kiln(&["prompt", "a (red car:1.2.3) here"]);
    assert_ne!(bad.code, 0, "a malformed weight must fail: {}", bad.stdout);
    assert!(
        bad.stderr
            .starts_with("kiln: malformed weight \"(red car:1.2.3)\" at character 3"),
        "{}",
        bad.stderr
    );

    let tiny = tiny_model();
    let json = kiln(&["prompt", "(red:1.2) car", "--model", arg(&tiny), "--json"]);
    assert_eq!(json.code, 0, "{}", json.stderr);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["exact"], true);
    assert_eq!(v["window"], 77);
    assert_eq!(v["pieces"][0]["text"], "red");
    assert_eq!(v["pieces"][0]["weight"], 1.2);
    let first = &v["chunks"][0]["tokens"][0];
    assert_eq!(first["weight"], 1.2, "{}", json.stdout);
}

#[test]
fn inspect_prints_the_parameters_and_the_recipe_of_a_render() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("one.toml");
    std::fs::write(
        &batch,
        "[defaults]\nmodel = \"tiny\"\nwidth = 64\nheight = 64\nsteps = 2\n\n[[items]]\nprompt = \"a (lighthouse:1.2) at dusk\"\nseed = 42\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let model = format!("tiny={}", tiny_model().display());
    let r = kiln(&["render", arg(&batch), "--model", &model, "--out", arg(&out)]);
    assert_eq!(r.code, 0, "kiln render failed: {}", r.stderr);
    let files = pngs(&out);
    assert_eq!(files.len(), 1);

    let text = kiln(&["inspect", arg(&files[0])]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains("a (lighthouse:1.2) at dusk"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("Seed: 42"), "{}", text.stdout);
    assert!(text.stdout.contains("\"seed\": 42"), "{}", text.stdout);

    let json = kiln(&["inspect", arg(&files[0]), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["kiln"]["recipe"]["seed"], 42);
    assert!(v["parameters"].as_str().unwrap().contains("Steps: 2"));

    let missing = kiln(&["inspect", arg(&dir.path().join("nope.png"))]);
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("cannot read"), "{}", missing.stderr);
}

#[test]
fn a_malformed_weight_in_a_batch_file_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let batch = dir.path().join("bad.toml");
    std::fs::write(
        &batch,
        "[defaults]\nmodel = \"tiny\"\n\n[[items]]\nprompt = \"a (red car:1.2.3) here\"\n",
    )
    .unwrap();
    // --dry-run validates locally: no coordinator is needed to refuse it.
    let r = kiln(&["submit", arg(&batch), "--dry-run"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stderr
            .contains("bad.toml:5: items[0].prompt: malformed weight"),
        "{}",
        r.stderr
    );
}

#[test]
fn worker_flags_for_memory_and_device_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let model = format!("tiny={}", tiny_model().display());
    let cases: &[(&[&str], &str)] = &[
        (
            &["--memory-budget", "1KiB"],
            "more than the memory budget of 1.00 KiB",
        ),
        (&["--memory-budget", "lots"], "\"lots\" is not a size"),
        (&["--device", "cuda:0"], "built without the cuda feature"),
        (&["--device", "tpu"], "--device must be cpu"),
    ];
    for (i, (flags, expected)) in cases.iter().enumerate() {
        let mut args = vec!["--model", model.as_str()];
        args.extend_from_slice(flags);
        // Nothing listens on this coordinator: the worker must fail before it matters.
        let mut w = worker(dir.path(), "http://127.0.0.1:9", &format!("w{i}"), &args).unwrap();
        let code = w.wait_exit(Duration::from_secs(60));
        assert!(matches!(code, Some(c) if c != 0), "{flags:?}: {code:?}");
        let log = w.output();
        assert!(log.contains(expected), "{flags:?}: {log}");
    }
}
