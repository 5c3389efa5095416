//! Results in object storage (#11): a coordinator with `--results
//! s3://BUCKET/PREFIX` against a real S3 API on loopback (moto, or another through
//! `KILN_TEST_S3_ENDPOINT`: see `kiln_tests::s3`), sim workers,
//! and the bucket listed by a foreign client (boto3).

use kiln_tests::s3::S3Server;
use kiln_tests::*;

/// The bucket's keys of one job, without its staging area and verifications.
fn job_keys(s3: &S3Server, job: &str) -> Vec<String> {
    s3.keys(&format!("farm/{job}/"))
        .expect("list the bucket")
        .into_iter()
        .filter(|k| !k.contains("/.verify/"))
        .collect()
}

#[test]
fn results_in_s3_are_published_fetched_and_verified() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let results = format!("s3://{}/farm", s3.bucket());
    let c = Coordinator::start_env(d, &["--results", &results], &env).unwrap();
    let _w1 = sim_worker(d, &c.url, "w1", &["--model", "tiny"], &[]).unwrap();
    let _w2 = sim_worker(d, &c.url, "w2", &["--model", "tiny"], &[]).unwrap();
    wait_for_workers(&c.url, 2);

    let batch = d.join("b.toml");
    sweep_file(&batch, "tiny", 2, 3, 2).unwrap();
    let out = kiln(&["submit", arg(&batch), "--json", "--coordinator", &c.url]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(&c.url, &job);

    // In the bucket: six images under their final names, the manifest, and
    // no staged upload left.
    let keys = job_keys(&s3, &job);
    let pngs_in_s3: Vec<&String> = keys.iter().filter(|k| k.ends_with(".png")).collect();
    assert_eq!(pngs_in_s3.len(), 6, "{keys:?}");
    assert!(
        keys.iter().all(|k| !k.contains("/.staging/")),
        "staging left behind: {keys:?}"
    );
    let manifest_key = format!("farm/{job}/manifest.jsonl");
    assert!(keys.contains(&manifest_key), "{keys:?}");
    let manifest_text = String::from_utf8(s3.get(&manifest_key).unwrap()).unwrap();
    let lines: Vec<serde_json::Value> = manifest_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for l in &lines {
        let key = format!("farm/{job}/{}", l["file"].as_str().unwrap());
        assert!(keys.contains(&key), "{key} is in the manifest, not in S3");
    }

    // kiln fetch from the S3-backed farm: every item exactly once, bytes as
    // the manifest says, decodable.
    let fetched = d.join("fetched");
    assert_exactly_once(&c.url, &job, &fetched, 6);
    for l in &lines {
        let name = l["file"].as_str().unwrap();
        assert_eq!(
            s3.get(&format!("farm/{job}/{name}")).unwrap(),
            std::fs::read(fetched.join(name)).unwrap(),
            "{name}: fetched bytes are the bucket's"
        );
    }

    // kiln verify re-renders into the bucket and compares.
    let verify = kiln(&["verify", &job, "--coordinator", &c.url]);
    assert_eq!(verify.code, 0, "{}\n{}", verify.stdout, verify.stderr);
    assert!(
        verify.stdout.contains("6 of 6 items byte-identical"),
        "{}",
        verify.stdout
    );
    let verified = s3.keys(&format!("farm/{job}/.verify/")).unwrap();
    assert_eq!(
        verified.iter().filter(|k| k.ends_with(".png")).count(),
        6,
        "{verified:?}"
    );

    // A series gets its contact sheet in the bucket.
    let series = submit_text(d, &c.url, "mira.toml", MIRA);
    watch_ok(&c.url, &series);
    let sheet = s3
        .get(&format!("farm/{series}/mira/contact-sheet.png"))
        .expect("the contact sheet is in the bucket");
    let path = d.join("sheet.png");
    std::fs::write(&path, sheet).unwrap();
    decode_png(&path).expect("the contact sheet decodes");
}

#[test]
fn an_unreachable_bucket_stops_the_coordinator_at_start() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let started = Coordinator::start_env(dir.path(), &["--results", "s3://no-such-bucket/x"], &env);
    let Err(e) = started else {
        panic!("a coordinator started on a bucket that does not exist");
    };
    let text = format!("{e:#}");
    assert!(
        text.contains("--results s3://no-such-bucket/x: cannot reach the result store"),
        "{text}"
    );
}
