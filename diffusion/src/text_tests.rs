//! Prompt weighting, chunking and the embedding cache, end to end on the tiny models.

use candle_core::Device;

use super::tests::{TestResult, distance, recipe, render, tiny};
use super::*;

/// `n` one-letter words: each is one token in the tiny vocabulary.
fn words(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| char::from(b'a' + (i % 26) as u8).to_string())
        .collect()
}

#[test]
fn weights_change_the_image() -> TestResult {
    let p = tiny();
    let plain = render(p, &recipe("a red castle on a hill", 3))?;
    for weighted in [
        "a (red:1.5) castle on a hill",
        "a (red) castle on a hill",
        "a [red] castle on a hill",
        "a ((red castle)) on a hill",
    ] {
        let image = render(p, &recipe(weighted, 3))?;
        let d = distance(&plain, &image);
        println!("{weighted:?}: {d:.2} per byte from the unweighted prompt");
        assert!(
            image != plain,
            "{weighted:?} rendered like the plain prompt"
        );
    }
    // A stronger weight moves the image further.
    let slight = render(p, &recipe("a (red:1.1) castle on a hill", 3))?;
    let strong = render(p, &recipe("a (red:2.0) castle on a hill", 3))?;
    assert!(distance(&plain, &strong) > distance(&plain, &slight));
    // The negative prompt is weighted too.
    let mut r = recipe("a red castle on a hill", 3);
    r.negative_prompt = "(blurry:1.6), low quality".into();
    assert!(render(p, &r)? != plain);
    Ok(())
}

#[test]
fn a_weight_of_one_is_no_weight() -> TestResult {
    let p = tiny();
    let plain = render(p, &recipe("a red castle on a hill", 4))?;
    for same in [
        "a (red:1.0) castle on a hill",
        "(a red castle on a hill:1)",
        "a ((red):0.9090909090909091) castle on a hill",
    ] {
        let image = render(p, &recipe(same, 4))?;
        let d = distance(&plain, &image);
        // 1.1 × (1 / 1.1) may round off 1.0; only the exact 1.0 forms must be identical.
        if same.contains("0.909") {
            assert!(d < 0.5, "{same:?}: {d}");
        } else {
            assert!(image == plain, "{same:?} differs from the plain prompt");
        }
    }
    Ok(())
}

#[test]
fn every_architecture_applies_weights() -> TestResult {
    for kind in TinyKind::ALL {
        let dir = tempfile::tempdir()?;
        write_tiny_model_kind(dir.path(), kind)?;
        let p = Pipeline::load(dir.path(), &Device::Cpu)?;
        let plain = render(&p, &recipe("a red castle", 5))?;
        let weighted = render(&p, &recipe("a (red:1.6) castle", 5))?;
        let one = render(&p, &recipe("a (red:1.0) castle", 5))?;
        assert!(weighted != plain, "{kind}: weights ignored");
        assert!(one == plain, "{kind}: a weight of 1 changed the image");
        if kind == TinyKind::Sdxl {
            // The pooled embedding is read before weighting: only the states change.
            let a = p.text.encode("a red castle", None)?;
            let b = p.text.encode("a (red:1.6) castle", None)?;
            let (pa, pb) = (a.pooled.ok_or("no pooled")?, b.pooled.ok_or("no pooled")?);
            assert_eq!(pa.to_vec2::<f32>()?, pb.to_vec2::<f32>()?);
            assert!(
                a.context.flatten_all()?.to_vec1::<f32>()?
                    != b.context.flatten_all()?.to_vec1::<f32>()?
            );
        }
    }
    Ok(())
}

#[test]
fn a_200_token_prompt_renders_and_differs_from_its_first_window() -> TestResult {
    let p = tiny();
    let words = words(200);
    let long = words.join(" ");
    // The first window: bos, the first 75 tokens, eos (77 positions).
    let first_window = words[..75].join(" ");
    assert_eq!(p.text.token_ids(&long)?.len(), 200);
    let context = p.text.encode(&long, Some(""))?.context;
    assert_eq!(
        context.dims(),
        [2, 3 * 77, 32],
        "200 tokens are three chunks"
    );
    let cut = p.text.encode(&first_window, Some(""))?.context;
    assert_eq!(cut.dims(), [2, 77, 32]);

    let full = render(p, &recipe(&long, 6))?;
    let truncated = render(p, &recipe(&first_window, 6))?;
    let d = distance(&full, &truncated);
    println!("200 tokens vs the first 75: {d:.2} per byte");
    assert!(
        full != truncated,
        "tokens past the first window had no effect"
    );
    Ok(())
}

#[test]
fn break_starts_a_new_chunk() -> TestResult {
    let p = tiny();
    let joined = p.text.encode("a red castle on a hill", None)?.context;
    let broken = p.text.encode("a red castle BREAK on a hill", None)?.context;
    assert_eq!(joined.dims(), [1, 77, 32]);
    assert_eq!(broken.dims(), [1, 2 * 77, 32]);
    // The chunk after BREAK is encoded on its own, as the same words alone are.
    let alone = p.text.encode("on a hill", None)?.context;
    let second = broken.narrow(1, 77, 77)?;
    assert_eq!(
        second.flatten_all()?.to_vec1::<f32>()?,
        alone.flatten_all()?.to_vec1::<f32>()?
    );
    let a = render(p, &recipe("a red castle on a hill", 7))?;
    let b = render(p, &recipe("a red castle BREAK on a hill", 7))?;
    assert!(a != b, "BREAK changed nothing");
    Ok(())
}

#[test]
fn a_malformed_weight_is_an_invalid_recipe() {
    let err = render(tiny(), &recipe("a (red:1.2.3) castle", 1)).err();
    assert!(
        matches!(&err, Some(PipelineError::InvalidRecipe { field: "prompt", message }) if message.contains("1.2.3")),
        "{err:?}"
    );
    let mut r = recipe("a castle", 1);
    r.negative_prompt = "(blurry:1.2.3)".into();
    let err = render(tiny(), &r).err();
    assert!(
        matches!(
            &err,
            Some(PipelineError::InvalidRecipe {
                field: "negative_prompt",
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn the_cache_serves_repeated_chunks_with_the_same_bytes() -> TestResult {
    // A fresh pipeline, so the counts are this test's own.
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path())?;
    let p = Pipeline::load(dir.path(), &Device::Cpu)?;
    let character = "an old sailor with a grey beard and a blue coat";
    let first = render(&p, &recipe(&format!("{character} BREAK on a ship"), 8))?;
    let (hits, misses, entries) = p.text.cache_stats();
    // Windows: the negative prompt and the empty padding chunk, the character, the shot.
    assert_eq!((hits, misses, entries), (0, 4, 4));

    // The next shot of the series encodes only its own chunk.
    render(&p, &recipe(&format!("{character} BREAK in a harbour"), 9))?;
    let (hits, misses, _) = p.text.cache_stats();
    assert_eq!(
        (hits, misses),
        (3, 5),
        "character, negative and padding came from the cache"
    );

    // A weighted variant shares the unweighted entry; the bytes of a cached
    // render are those of the first.
    render(
        &p,
        &recipe(&format!("{character} BREAK (on a ship:1.3)"), 8),
    )?;
    assert_eq!(
        p.text.cache_stats().1,
        5,
        "weights are applied after the cache"
    );
    assert!(render(&p, &recipe(&format!("{character} BREAK on a ship"), 8))? == first);
    // Cached or not, the tiny pipeline shared by other tests renders the same bytes.
    assert!(render(tiny(), &recipe(&format!("{character} BREAK on a ship"), 8))? == first);
    Ok(())
}
