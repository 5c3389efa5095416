//! Issue #11, traces: `kiln submit`, a coordinator and a worker export OTLP
//! spans to a receiver in the test, and one task is one trace from the CLI
//! to the PNG, the `traceparent` crossing every process boundary.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use kiln_tests::otlp::{ReceivedSpan, Receiver};
use kiln_tests::{
    Coordinator, Proc, arg, job_id, kiln_env, sim_worker, sweep_file, tiny_model, wait_for,
    wait_for_workers, watch_ok,
};

/// Batch exporters flush every 100 ms instead of every 5 s.
const SCHEDULE_DELAY: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "100");

/// A farm whose three kinds of process export to `receiver`, with one worker
/// started by `start_worker` (given the env to export with).
fn traced_farm(
    dir: &Path,
    receiver: &Receiver,
    start_worker: impl FnOnce(&str, &[(&str, &str)]) -> Proc,
) -> (Coordinator, Proc) {
    // The coordinator gets the flag, the others the environment variable: both ways work.
    let c = Coordinator::start_env(
        dir,
        &["--otlp-endpoint", &receiver.endpoint],
        &[SCHEDULE_DELAY],
    )
    .unwrap();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        SCHEDULE_DELAY,
    ];
    let w = start_worker(&c.url, &env);
    wait_for_workers(&c.url, 1);
    (c, w)
}

/// Submits `batch` with `kiln submit`, exporting its spans, and waits for the job.
fn submit_traced(receiver: &Receiver, url: &str, batch: &Path) -> String {
    let out = kiln_env(
        &["submit", arg(batch), "--json", "--coordinator", url],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)],
    );
    assert_eq!(out.code, 0, "submit: {}\n{}", out.stdout, out.stderr);
    let job = job_id(&out.stdout).unwrap();
    watch_ok(url, &job);
    job
}

/// The one span named `name` from `service` in `spans`.
fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {service} span {name:?} in {spans:#?}"
    );
    found[0]
}

/// The names of the spans whose parent is `parent`.
fn children(spans: &[ReceivedSpan], parent: &ReceivedSpan) -> BTreeSet<String> {
    spans
        .iter()
        .filter(|s| s.parent_id == parent.span_id && s.trace_id == parent.trace_id)
        .map(|s| s.name.clone())
        .collect()
}

/// Waits until the spans of the whole chain have arrived (the exporters flush
/// on their schedule, the CLI at exit) and returns them.
fn chain_spans(receiver: &Receiver, worker_spans: &[&str]) -> Vec<ReceivedSpan> {
    let wanted: Vec<(&str, &str)> = [
        ("kiln", "submit"),
        ("kiln-coordinator", "submit_job"),
        ("kiln-coordinator", "lease"),
        ("kiln-coordinator", "result_intake"),
        ("kiln-worker", "render"),
        ("kiln-worker", "report"),
    ]
    .into_iter()
    .chain(worker_spans.iter().map(|name| ("kiln-worker", *name)))
    .collect();
    wait_for(Duration::from_secs(60), "the spans of the chain", || {
        let spans = receiver.spans();
        wanted
            .iter()
            .all(|(service, name)| {
                spans
                    .iter()
                    .any(|s| s.service == *service && s.name == *name)
            })
            .then_some(spans)
    })
}

/// Asserts that submit → submit_job → lease → render / report → result_intake
/// is one trace with each span the child of the one before, and returns the
/// worker's render span.
fn assert_one_trace(spans: &[ReceivedSpan]) -> ReceivedSpan {
    let submit = one(spans, "kiln", "submit");
    let admission = one(spans, "kiln-coordinator", "submit_job");
    let lease = one(spans, "kiln-coordinator", "lease");
    let render = one(spans, "kiln-worker", "render");
    let report = one(spans, "kiln-worker", "report");
    let intake = one(spans, "kiln-coordinator", "result_intake");
    assert_eq!(submit.parent_id, "", "the CLI's span is the root");
    for (child, parent) in [
        (admission, submit),
        (lease, admission),
        (render, lease),
        (report, lease),
        (intake, report),
    ] {
        assert_eq!(
            child.trace_id, submit.trace_id,
            "{} is not in the CLI's trace",
            child.name
        );
        assert_eq!(
            child.parent_id, parent.span_id,
            "{} is not a child of {}",
            child.name, parent.name
        );
    }
    let services: BTreeSet<&str> = spans
        .iter()
        .filter(|s| s.trace_id == submit.trace_id)
        .map(|s| s.service.as_str())
        .collect();
    assert_eq!(
        services,
        BTreeSet::from(["kiln", "kiln-coordinator", "kiln-worker"])
    );
    render.clone()
}

/// A candle worker on the tiny model: the render span holds the engine's
/// stages, text encoding inside the preparation.
#[test]
fn one_task_is_one_trace_from_the_cli_to_the_png() {
    let receiver = Receiver::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = format!("tiny={}", tiny_model().display());
    let (c, _w) = traced_farm(d, &receiver, |url, env| {
        Proc::spawn_env(
            "kiln-worker",
            &["--coordinator", url, "--id", "w1", "--model", &model],
            env,
            &d.join("w1.log"),
        )
        .unwrap()
    });
    let batch = d.join("one.toml");
    sweep_file(&batch, "tiny", 1, 1, 2).unwrap();
    submit_traced(&receiver, &c.url, &batch);

    let engine = [
        "prepare",
        "text_encode",
        "denoise",
        "vae_decode",
        "png_encode",
    ];
    let spans = chain_spans(&receiver, &engine);
    let render = assert_one_trace(&spans);
    assert_eq!(
        children(&spans, &render),
        BTreeSet::from(["prepare", "denoise", "vae_decode", "png_encode"].map(String::from)),
        "the render span's children"
    );
    let prepare = one(&spans, "kiln-worker", "prepare");
    assert_eq!(
        children(&spans, prepare),
        BTreeSet::from(["text_encode".to_string()])
    );
}

/// The sim renderer runs no diffusion: its render span holds only the PNG
/// encoding it really does.
#[test]
fn a_sim_worker_continues_the_trace_with_the_work_it_does() {
    let receiver = Receiver::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (c, _w) = traced_farm(d, &receiver, |url, env| {
        sim_worker(d, url, "sim1", &[], env).unwrap()
    });
    let batch = d.join("one.toml");
    sweep_file(&batch, "simtoy", 1, 1, 2).unwrap();
    submit_traced(&receiver, &c.url, &batch);

    let spans = chain_spans(&receiver, &["png_encode"]);
    let render = assert_one_trace(&spans);
    assert_eq!(
        children(&spans, &render),
        BTreeSet::from(["png_encode".to_string()])
    );
}
