//! `scripts/gpu-check`, the script carried to GPU machines (#15), in its
//! `--device cpu` dry run: the same farm, batch files, fetches and
//! measurements as on a GPU, with the debug binaries and the tiny model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_tests::binary;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check")
}

fn gpu_check(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("run scripts/gpu-check")
}

#[test]
fn the_dry_run_renders_batches_of_one_and_four_and_prints_images_per_second() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let bin = binary("kiln");
    let bin = bin.parent().unwrap().to_str().unwrap();
    let out = gpu_check(&[
        "--device",
        "cpu",
        "--rounds",
        "2",
        "--bin",
        bin,
        "--work",
        work.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // model side steps batch images seconds images/s peak-metric peak-smi
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("tiny "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for (row, batch) in rows.iter().zip(["1", "4"]) {
        assert_eq!(row[..4], ["tiny", "64", "4", batch], "{stdout}");
        let images: u32 = row[4].parse().unwrap();
        assert_eq!(images, 2 * batch.parse::<u32>().unwrap(), "{stdout}");
        let seconds: f64 = row[5].parse().unwrap();
        let rate: f64 = row[6].parse().unwrap();
        assert!(seconds > 0.0 && rate > 0.0, "{stdout}");
        assert!(
            (rate * seconds - f64::from(images)).abs() < 0.05 * f64::from(images),
            "{stdout}"
        );
        // A CPU has no device memory to report.
        assert_eq!(row[7..], ["n/a", "n/a"], "{stdout}");
    }
    assert!(!work.exists(), "the work folder was left behind");
}

#[test]
fn a_device_it_cannot_check_is_refused_before_anything_starts() {
    let out = gpu_check(&["--device", "tpu:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "gpu-check: --device must be cuda:N or cpu, got 'tpu:0'"
    );
    let out = gpu_check(&["--device", "cpu", "--bin", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "gpu-check: no /nonexistent/kiln (give --bin DIR)"
    );
}
