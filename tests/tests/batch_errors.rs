//! Malformed batch files (issue #6): each is refused with exactly one line,
//! `FILE:LINE: FIELD: what is wrong`, a non-zero exit and nothing submitted,
//! by `kiln submit --dry-run`, by `kiln submit` and by `kiln render`; and the
//! coordinator refuses the same jobs from any client.

use std::path::Path;
use std::process::Command;

use kiln_proto::convert::job_spec_to_pb;
use kiln_proto::pb;
use kiln_proto::spec::{JobSpec, RecipeFields, SeriesSpec};
use kiln_tests::*;

/// A malformed batch file and what its one error line must say.
struct Case {
    /// File name, and the name the error starts with.
    file: &'static str,
    /// The file's bytes.
    bytes: Vec<u8>,
    /// The line the error points at.
    line: usize,
    /// Text the rest of the line must contain: the field, the range.
    says: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    let deep = format!("[defaults]\nmodel=\"tiny\"\na{} = 1\n", ".a".repeat(80));
    let mut utf8 = b"[defaults]\nmodel = \"tiny\"\n[[items]]\nprompt = \"fox ".to_vec();
    utf8.extend_from_slice(b"\xff\"\n");
    let series = |name: &str| {
        format!(
            "[series.\"{name}\"]\nmodel = \"tiny\"\ncharacter = \"Mira\"\nanchor = true\n[[series.\"{name}\".shots]]\nprompt = \"x\"\n"
        )
        .into_bytes()
    };
    let items = |head: &str, prompt: &str| {
        format!("{head}[defaults]\nmodel = \"tiny\"\n[[items]]\nprompt = \"{prompt}\"\n")
            .into_bytes()
    };
    vec![
        Case {
            file: "utf8.toml",
            bytes: utf8,
            line: 4,
            says: &["items[0].prompt:", "UTF-8"],
        },
        Case {
            file: "deep.toml",
            bytes: deep.into_bytes(),
            line: 3,
            says: &["nested more than 32"],
        },
        Case {
            file: "dots.toml",
            bytes: series(".."),
            line: 1,
            says: &["series...:", "\"..\""],
        },
        Case {
            file: "dot.toml",
            bytes: series("."),
            line: 1,
            says: &["series..:", "\".\""],
        },
        Case {
            file: "proj.toml",
            bytes: items("project = \"a/b\"\n", "x"),
            line: 1,
            says: &["project:", "\"a/b\""],
        },
        Case {
            file: "name.toml",
            bytes: items(&format!("name = \"{}\"\n", "n".repeat(300)), "x"),
            line: 1,
            says: &["name:", "300 bytes", "256"],
        },
        Case {
            file: "nul.toml",
            bytes: items("", "fox\\u0000cub"),
            line: 4,
            says: &["items[0].prompt:", "U+0000"],
        },
        Case {
            file: "esc.toml",
            bytes: items("", "fox\\u001b[31m"),
            line: 4,
            says: &["items[0].prompt:", "U+001B"],
        },
        Case {
            file: "steps.toml",
            bytes: b"[defaults]\nmodel = \"tiny\"\nsteps = -1\n[[items]]\nprompt = \"x\"\n"
                .to_vec(),
            line: 3,
            says: &["defaults.steps:", "between 1 and 500", "-1"],
        },
        Case {
            file: "str.toml",
            bytes: b"[defaults]\nmodel = \"tiny\"\nstrength = 1.5\n[[items]]\nprompt = \"x\"\n"
                .to_vec(),
            line: 3,
            says: &["defaults.strength:", "1.5"],
        },
        Case {
            file: "itemstr.toml",
            bytes: b"[defaults]\nmodel = \"tiny\"\n[[items]]\nprompt = \"x\"\nstrength = 0.5\n"
                .to_vec(),
            line: 5,
            says: &["items[0].strength:", "init_image"],
        },
    ]
}

/// Asserts that `out` is a refusal of one line, `FILE:LINE: ...`, saying `says`.
fn assert_refused(what: &str, out: &Output, file: &Path, line: Option<usize>, says: &[&str]) {
    assert_ne!(out.code, 0, "{what} must be refused: {}", out.stdout);
    assert!(!out.stderr.contains("panicked"), "{what}: {}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line, got {:?}", out.stderr);
    let at = match line {
        Some(n) => format!("{}:{n}: ", file.display()),
        None => format!("{}: ", file.display()),
    };
    assert!(
        lines[0].contains(&at),
        "{what}: the line must start with {at:?}: {}",
        lines[0]
    );
    for text in says {
        assert!(
            lines[0].contains(text),
            "{what}: the line must say {text:?}: {}",
            lines[0]
        );
    }
}

#[test]
fn malformed_batch_files_are_refused_with_one_located_line() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens here: a refusal that tried to submit would say "cannot reach".
    let nowhere = "http://127.0.0.1:9";
    let out = dir.path().join("out");
    for case in cases() {
        let file = dir.path().join(case.file);
        std::fs::write(&file, &case.bytes).unwrap();
        let runs: [(&str, Vec<&str>); 3] = [
            ("submit --dry-run", vec!["submit", arg(&file), "--dry-run"]),
            (
                "submit",
                vec!["submit", arg(&file), "--coordinator", nowhere],
            ),
            (
                "render",
                vec![
                    "render",
                    arg(&file),
                    "--model",
                    "tiny=/nonexistent",
                    "--out",
                    arg(&out),
                ],
            ),
        ];
        for (how, args) in runs {
            let what = format!("{how} {}", case.file);
            assert_refused(&what, &kiln(&args), &file, Some(case.line), case.says);
        }
    }
    assert!(!out.exists(), "kiln render must write nothing");
}

#[test]
fn endless_and_oversized_files_are_refused_without_reading_them_whole() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    let mut text = String::from("[defaults]\nmodel = \"tiny\"\n[[items]]\nprompt = \"x\"\n");
    text.push_str(&"# padding\n".repeat(17 * 1024 * 1024 / 10));
    std::fs::write(&big, text).unwrap();
    let r = kiln(&["submit", arg(&big), "--dry-run"]);
    assert_refused("a 17 MiB file", &r, &big, None, &["16 MiB"]);

    // /dev/zero never ends: under a 4 GB address-space limit, reading it
    // whole would run out of memory.
    let zero = Path::new("/dev/zero");
    let script = format!(
        "ulimit -v 4000000; exec '{}' submit /dev/zero --dry-run",
        binary("kiln").display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let r = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(!r.stderr.contains("out of memory"), "{}", r.stderr);
    assert_refused("/dev/zero", &r, zero, None, &["16 MiB"]);
}

#[test]
fn the_coordinator_refuses_what_dry_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(dir.path(), &["--model-grace", "0s"]).unwrap();
    let item = |prompt: &str| RecipeFields {
        prompt: Some(prompt.into()),
        ..Default::default()
    };
    let base = || JobSpec {
        defaults: RecipeFields {
            model: Some("tiny".into()),
            width: Some(64),
            height: Some(64),
            ..Default::default()
        },
        items: vec![item("x")],
        ..Default::default()
    };
    let mut specs: Vec<(&str, JobSpec)> = Vec::new();
    let mut s = base();
    s.project = "a/b".into();
    specs.push(("project", s));
    let mut s = base();
    s.name = "n".repeat(300);
    specs.push(("name", s));
    let mut s = base();
    s.items[0] = item("fox\u{0}cub");
    specs.push(("items[0].prompt", s));
    let mut s = base();
    s.defaults.strength = Some(1.5);
    specs.push(("defaults.strength", s));
    let mut s = base();
    s.items.clear();
    s.series.push(SeriesSpec {
        name: "..".into(),
        character: "Mira".into(),
        anchor: true,
        shots: vec![item("x")],
        ..Default::default()
    });
    specs.push(("series...", s));
    for (field, spec) in specs {
        let status = block(async {
            coord
                .client()
                .await
                .submit_job(pb::SubmitJobRequest {
                    spec: Some(job_spec_to_pb(&spec)),
                    idempotency_key: String::new(),
                })
                .await
                .unwrap_err()
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    let jobs = kiln(&["jobs", "--json", "--coordinator", &coord.url]);
    assert_eq!(jobs.stdout.trim(), "[]", "nothing may be queued");
}
