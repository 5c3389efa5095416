//! Issue #14: ControlNets and their preprocessors, through the real binaries.
//!
//! - `kiln preprocess canny` on a white square on black finds the square's
//!   border and nothing else.

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
