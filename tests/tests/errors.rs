//! Issue #6: errors say what failed. Real processes on loopback: a lost
//! result is the result store's failure, not an unreachable coordinator, and
//! a huge value never comes back whole in a status.

use kiln_proto::pb;
use kiln_tests::*;

/// Two small items for the sim renderer.
const TWO_ITEMS: &str = r#"[defaults]
model = "tiny"
width = 64
height = 64
steps = 2

[[items]]
prompt = "a red fox"
seed = 1

[[items]]
prompt = "a brass camera"
seed = 2
"#;

/// The hint the CLI gives only when the coordinator cannot be reached.
const CONNECTION_HINT: &str = "is kiln-coordinator running";

#[test]
fn a_lost_result_is_reported_as_the_result_store_failing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &[]).unwrap();
    let _w = worker(
        d,
        &coord.url,
        "w1",
        &["--model", "tiny", "--renderer", "sim", "--sim-step", "0ms"],
    )
    .unwrap();
    wait_for_workers(&coord.url, 1);
    let job = submit_text(d, &coord.url, "two.toml", TWO_ITEMS);
    watch_ok(&coord.url, &job);
    let files = pngs(&coord.results.join(&job));
    assert_eq!(files.len(), 2, "{files:?}");
    let lost = &files[1];
    let lost_name = lost.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::remove_file(lost).unwrap();

    let out = d.join("out");
    let r = kiln(&[
        "fetch",
        &job,
        "--out",
        arg(&out),
        "--coordinator",
        &coord.url,
    ]);
    assert_ne!(r.code, 0, "a lost image must fail the fetch: {}", r.stdout);
    assert!(
        r.stderr.contains("result store"),
        "the error must name the result store: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!("{job}/{lost_name}")),
        "the error must name the lost object: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains("not found"),
        "the error must say what is wrong with it: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains(CONNECTION_HINT),
        "the coordinator answered, so no connection hint: {}",
        r.stderr
    );

    // The same refusal on the wire: DATA_LOSS, not UNAVAILABLE.
    let status = block(async {
        let mut farm = coord.client().await;
        let mut stream = farm
            .fetch_results(pb::FetchResultsRequest {
                job_id: job.clone(),
                from_index: 0,
                held: Vec::new(),
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error"),
                Err(status) => break status,
            }
        }
    });
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
}

#[test]
fn a_huge_job_id_is_refused_with_a_short_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coord = Coordinator::start(d, &[]).unwrap();
    let huge = "j".repeat(100_000);

    let status = block(async {
        let mut farm = coord.client().await;
        farm.get_job(pb::GetJobRequest {
            job_id: huge.clone(),
            include_tasks: false,
        })
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().len() < 1024,
        "{} bytes: {}",
        status.message().len(),
        &status.message()[..200.min(status.message().len())]
    );
    assert!(status.message().starts_with("job_id: not a job id"));
    let field = kiln_proto::status::field_error(&status).expect("the field travels in the details");
    assert_eq!(field.path, "job_id");

    let r = kiln(&["watch", &huge, "--coordinator", &coord.url]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.len() < 1024, "{} bytes of stderr", r.stderr.len());
    assert!(r.stderr.contains("job_id"), "{}", r.stderr);
    assert!(!r.stderr.contains(CONNECTION_HINT), "{}", r.stderr);
}
