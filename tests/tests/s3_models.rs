//! Models from object storage (#12): `kiln model push` to a real S3 API on
//! loopback (moto, or another through `KILN_TEST_S3_ENDPOINT`: see
//! `kiln_tests::s3`), candle workers with `--model NAME=s3://… --model-cache
//! DIR` that render from the fetched copy, start again from the cache when
//! the bucket's objects are gone or the endpoint is down, and refuse a
//! corrupt download naming the file.

use std::path::Path;
use std::time::Duration;

use kiln_proto::pb;
use kiln_tests::s3::S3Server;
use kiln_tests::*;

/// The model hashes the coordinator's workers announced, by worker id.
fn announced(c: &Coordinator) -> Vec<(String, Vec<(String, String)>)> {
    block(async {
        let mut client = c.client().await;
        let workers = client
            .list_workers(pb::ListWorkersRequest::default())
            .await
            .expect("ListWorkers")
            .into_inner()
            .workers;
        workers
            .into_iter()
            .map(|w| {
                let models = w.models.into_iter().map(|m| (m.name, m.hash)).collect();
                (w.worker_id, models)
            })
            .collect()
    })
}

/// Waits until worker `id` registered and returns the models it announced.
fn registered(c: &Coordinator, id: &str) -> Vec<(String, String)> {
    wait_for(
        Duration::from_secs(120),
        &format!("{id} to register"),
        || {
            announced(c)
                .into_iter()
                .find(|(w, _)| w == id)
                .map(|(_, models)| models)
        },
    )
}

/// Starts a candle worker with the tiny model from `url`, cached in `cache`.
fn s3_worker(
    d: &Path,
    c: &Coordinator,
    id: &str,
    url: &str,
    cache: &Path,
    env: &[(&str, &str)],
) -> Proc {
    let model = format!("tiny={url}");
    Proc::spawn_env(
        "kiln-worker",
        &[
            "--coordinator",
            &c.url,
            "--id",
            id,
            "--model",
            &model,
            "--model-cache",
            arg(cache),
        ],
        env,
        &d.join(format!("{id}.log")),
    )
    .unwrap()
}

#[test]
fn a_pushed_model_is_fetched_checked_and_reused_from_the_cache() {
    let mut s3 = Some(S3Server::start().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bucket, env) = {
        let s3 = s3.as_ref().unwrap();
        (s3.bucket().to_string(), s3.env())
    };
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // Push a fresh tiny model; its hash is the one `kiln model tiny` printed.
    let model = d.join("tiny");
    let out = kiln(&["model", "tiny", "--out", arg(&model)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let hash = out
        .stdout
        .split("(hash ")
        .nth(1)
        .unwrap()
        .trim_end()
        .trim_end_matches(')')
        .to_string();
    assert_eq!(hash.len(), 64, "{}", out.stdout);
    let url = format!("s3://{bucket}/models/tiny");
    let out = kiln_env(&["model", "push", arg(&model), &url], &env);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains(&hash), "{}", out.stdout);

    // The bucket holds every file of the folder (no dot files) and the
    // manifest, whose sizes and sha256s are the local files'.
    let s3_ref = s3.as_ref().unwrap();
    let keys = s3_ref.keys("models/tiny/").unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3_ref.get("models/tiny/kiln-model.json").unwrap()).unwrap();
    assert_eq!(manifest["hash"], hash.as_str());
    let files = manifest["files"].as_array().unwrap();
    assert!(files.len() >= 5, "{manifest}");
    for f in files {
        let rel = f["path"].as_str().unwrap();
        assert!(
            keys.contains(&format!("models/tiny/{rel}")),
            "{rel} not in {keys:?}"
        );
        assert!(!rel.starts_with('.'), "{rel}");
        let local = model.join(rel);
        assert_eq!(f["size"], std::fs::metadata(&local).unwrap().len());
        assert_eq!(f["sha256"], sha256_file(&local).unwrap().as_str());
    }
    assert_eq!(keys.len(), files.len() + 1, "{keys:?}");

    // A worker fetches it, announces the same hash, and renders a job.
    let c = Coordinator::start(d, &[]).unwrap();
    let cache = d.join("cache");
    let mut w1 = s3_worker(d, &c, "w1", &url, &cache, &env);
    assert_eq!(
        registered(&c, "w1"),
        vec![("tiny".to_string(), hash.clone())]
    );
    assert!(cache.join(&hash).join("model_index.json").is_file());
    let batch = d.join("b.toml");
    sweep_file(&batch, "tiny", 1, 2, 2).unwrap();
    let out = kiln(&["submit", arg(&batch), "--json", "--coordinator", &c.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(&c.url, &job);
    let fetched = d.join("out");
    let out = kiln(&[
        "fetch",
        &job,
        "--out",
        arg(&fetched),
        "--coordinator",
        &c.url,
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(pngs(&fetched).len(), 2);
    for png in pngs(&fetched) {
        assert_eq!(decode_png(&png).unwrap().width, 64);
    }
    w1.kill();

    // A corrupt object: a fresh cache refuses it, naming the file, and keeps nothing.
    let weights = files
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .find(|p| p.starts_with("unet/"))
        .unwrap()
        .to_string();
    let mut bytes = s3_ref.get(&format!("models/tiny/{weights}")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    s3_ref
        .put(&format!("models/tiny/{weights}"), &bytes)
        .unwrap();
    let fresh = d.join("fresh-cache");
    let mut w2 = s3_worker(d, &c, "w2", &url, &fresh, &env);
    let code = w2.wait_exit(Duration::from_secs(120));
    assert!(
        matches!(code, Some(c) if c != 0),
        "{code:?}: {}",
        w2.output()
    );
    let log = w2.output();
    assert!(log.contains(&format!("{weights}: sha256 ")), "{log}");
    assert!(log.contains("corrupt"), "{log}");
    assert!(!fresh.join(&hash).exists());

    // The first cache still matches the manifest: reused without a
    // download (which would now meet the corrupt object).
    let mut w3 = s3_worker(d, &c, "w3", &url, &cache, &env);
    assert_eq!(
        registered(&c, "w3"),
        vec![("tiny".to_string(), hash.clone())]
    );
    assert!(
        w3.output().contains("model found in the cache"),
        "{}",
        w3.output()
    );
    w3.kill();

    // The manifest gone from the bucket: the cached copy.
    s3_ref.delete("models/tiny/kiln-model.json").unwrap();
    let mut w4 = s3_worker(d, &c, "w4", &url, &cache, &env);
    assert_eq!(
        registered(&c, "w4"),
        vec![("tiny".to_string(), hash.clone())]
    );
    assert!(
        w4.output().contains("using the cached copy"),
        "{}",
        w4.output()
    );
    w4.kill();

    // The endpoint down: the cached copy.
    drop(s3.take());
    let mut w5 = s3_worker(d, &c, "w5", &url, &cache, &env);
    assert_eq!(
        registered(&c, "w5"),
        vec![("tiny".to_string(), hash.clone())]
    );
    assert!(
        w5.output().contains("using the cached copy"),
        "{}",
        w5.output()
    );
    w5.kill();

    // A bucket model without a cache is refused at start.
    let mut w6 = Proc::spawn_env(
        "kiln-worker",
        &[
            "--coordinator",
            &c.url,
            "--id",
            "w6",
            "--model",
            &format!("tiny={url}"),
        ],
        &env,
        &d.join("w6.log"),
    )
    .unwrap();
    let code = w6.wait_exit(Duration::from_secs(60));
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    assert!(
        w6.output().contains("needs --model-cache"),
        "{}",
        w6.output()
    );
}
