//! The dashboard's HTTP answers over a memory store: sessions, CSRF,
//! roles, project isolation, pagination, the event stream and thumbnails.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures::StreamExt;
use kiln_proto::ids::{JobId, TaskId, WorkerId};
use kiln_proto::recipe::{Recipe, Scheduler};
use tower::ServiceExt;

use super::*;
use crate::auth::{Auth, token_hash};
use crate::config::CoordinatorConfig;
use crate::results::ResultStore;
use crate::store::{MemoryStore, ModelInfo, NewJob, NewTask, WorkerRegistration};

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";
const VIEWER: &str = "viewer-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

struct Farm {
    core: Arc<Core>,
    router: Router,
    _dir: tempfile::TempDir,
}

fn farm(auth: bool) -> Farm {
    let dir = tempfile::tempdir().unwrap();
    let mut core = Core::new(
        Arc::new(MemoryStore::new()),
        ResultStore::in_memory(),
        CoordinatorConfig::default(),
    );
    if auth {
        let mut text = String::new();
        for (name, token, role, projects) in [
            ("alice", ALICE, "submitter", "[\"a\"]"),
            ("bob", BOB, "submitter", "[\"b\"]"),
            ("vera", VIEWER, "viewer", "[\"a\"]"),
            ("root", ADMIN, "admin", "[]"),
        ] {
            text.push_str(&format!(
                "[[token]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"{role}\"\nprojects = {projects}\n\n",
                hex::encode(token_hash(token))
            ));
        }
        let file = dir.path().join("auth.toml");
        std::fs::write(&file, text).unwrap();
        core.auth = Arc::new(Auth::open(&file).unwrap());
    }
    let core = Arc::new(core);
    Farm {
        router: router(core.clone(), false),
        core,
        _dir: dir,
    }
}

fn recipe(seed: u64) -> Recipe {
    Recipe {
        model: "m".into(),
        model_hash: String::new(),
        prompt: format!("a lighthouse {seed}"),
        negative_prompt: String::new(),
        seed,
        steps: 4,
        guidance: 5.0,
        width: 64,
        height: 64,
        scheduler: Scheduler::Ddim,
        karras: false,
        eta: 0.0,
        strength: 1.0,
        init_image: None,
        mask: None,
        noise_seed: None,
        extras: Default::default(),
    }
}

async fn job(f: &Farm, name: &str, project: &str, tasks: u32) -> JobId {
    let new = NewJob {
        id: JobId::new(),
        name: name.into(),
        project: project.into(),
        priority: 0,
        idempotency_key: None,
        tasks: (0..tasks)
            .map(|i| NewTask {
                id: TaskId::new(),
                index: i,
                recipe: recipe(u64::from(i)),
                file_name: format!("{i:05}-a-lighthouse.png"),
                series: None,
                avoid: Vec::new(),
            })
            .collect(),
        blobs: Vec::new(),
        pin_class: false,
        class: None,
        dedupe: false,
        verify_of: None,
        traceparent: None,
        notify: Vec::new(),
        submitted_by: Some(format!("{project}-submitter")),
    };
    f.core.store.create_job(new).await.unwrap().0.id
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn send(f: &Farm, req: Request<Body>) -> Answer {
    let response = f.router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn get(f: &Farm, path: &str, cookies: &str) -> Answer {
    let mut req = Request::get(path);
    if !cookies.is_empty() {
        req = req.header(header::COOKIE, cookies);
    }
    send(f, req.body(Body::empty()).unwrap()).await
}

async fn post(f: &Farm, path: &str, cookies: &str, form: &str) -> Answer {
    let req = Request::post(path)
        .header(header::COOKIE, cookies)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_string()))
        .unwrap();
    send(f, req).await
}

/// The value of cookie `name` among an answer's `Set-Cookie` headers.
fn set_cookie(a: &Answer, name: &str) -> Option<(String, String)> {
    a.headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            let value = v[name.len() + 1..].split(';').next().unwrap().to_string();
            (value, v.to_string())
        })
}

/// Logs in through the form; returns the session's cookies and CSRF token.
async fn login(f: &Farm, token: &str) -> (String, String) {
    let form = get(f, "/login", "").await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(
        form.body.contains("type=\"password\" name=\"token\""),
        "{}",
        form.body
    );
    let (csrf, _) = set_cookie(&form, session::CSRF_COOKIE).expect("a CSRF cookie");
    let done = post(
        f,
        "/login",
        &format!("kiln_csrf={csrf}"),
        &format!("csrf={csrf}&token={token}"),
    )
    .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let (token_cookie, full) = set_cookie(&done, session::TOKEN_COOKIE).expect("a session cookie");
    assert!(
        full.contains("HttpOnly") && full.contains("SameSite=Strict"),
        "{full}"
    );
    let (csrf, _) = set_cookie(&done, session::CSRF_COOKIE).expect("a fresh CSRF token");
    (format!("kiln_token={token_cookie}; kiln_csrf={csrf}"), csrf)
}

fn rows(body: &str) -> usize {
    body.matches("<tr data-job=").count()
}

#[tokio::test]
async fn without_a_session_pages_go_to_the_login_form_and_apis_answer_401() {
    let f = farm(true);
    let id = job(&f, "secret-study", "a", 1).await;
    let page = get(&f, "/", "").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.headers[header::LOCATION], "/login");
    for path in [
        format!("/jobs/{id}"),
        "/workers".to_string(),
        "/queue".to_string(),
    ] {
        assert_eq!(
            get(&f, &path, "").await.status,
            StatusCode::SEE_OTHER,
            "{path}"
        );
    }
    for path in [
        "/api/v1/events?view=jobs".to_string(),
        format!("/api/v1/jobs/{id}/images/0"),
        format!("/api/v1/events?job={id}"),
    ] {
        let a = get(&f, &path, "").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(!a.body.contains("secret-study"));
    }
    // A forged or stale cookie is no session either.
    let a = get(&f, "/", "kiln_token=not-a-token").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn login_needs_its_csrf_token_and_a_known_token() {
    let f = farm(true);
    let form = get(&f, "/login", "").await;
    let (csrf, _) = set_cookie(&form, session::CSRF_COOKIE).unwrap();
    let no_field = post(
        &f,
        "/login",
        &format!("kiln_csrf={csrf}"),
        &format!("token={ALICE}"),
    )
    .await;
    assert_eq!(no_field.status, StatusCode::FORBIDDEN);
    let other = "0".repeat(64);
    let mismatch = post(
        &f,
        "/login",
        &format!("kiln_csrf={csrf}"),
        &format!("csrf={other}&token={ALICE}"),
    )
    .await;
    assert_eq!(mismatch.status, StatusCode::FORBIDDEN);
    assert!(set_cookie(&mismatch, session::TOKEN_COOKIE).is_none());
    let unknown = post(
        &f,
        "/login",
        &format!("kiln_csrf={csrf}"),
        &format!("csrf={csrf}&token=nobody"),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(unknown.body.contains("unknown token"), "{}", unknown.body);
    assert!(set_cookie(&unknown, session::TOKEN_COOKIE).is_none());
    let (cookies, csrf) = login(&f, ALICE).await;
    let jobs = get(&f, "/", &cookies).await;
    assert_eq!(jobs.status, StatusCode::OK);
    assert!(jobs.body.contains("alice (submitter)"), "{}", jobs.body);
    let out = post(&f, "/logout", &cookies, &format!("csrf={csrf}")).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    let (cleared, full) = set_cookie(&out, session::TOKEN_COOKIE).unwrap();
    assert!(cleared.is_empty() && full.contains("Max-Age=0"), "{full}");
}

#[tokio::test]
async fn cookies_are_secure_over_tls() {
    let mut f = farm(true);
    f.router = router(f.core.clone(), true);
    let form = get(&f, "/login", "").await;
    let (_, full) = set_cookie(&form, session::CSRF_COOKIE).unwrap();
    assert!(full.contains("; Secure"), "{full}");
}

#[tokio::test]
async fn a_token_sees_only_its_projects() {
    let f = farm(true);
    let mine = job(&f, "lighthouse-study", "a", 2).await;
    let theirs = job(&f, "harbour-study", "b", 2).await;
    let (alice, _) = login(&f, ALICE).await;
    let page = get(&f, "/", &alice).await;
    assert!(page.body.contains("lighthouse-study") && !page.body.contains("harbour-study"));
    assert_eq!(
        get(&f, &format!("/jobs/{mine}"), &alice).await.status,
        StatusCode::OK
    );
    for path in [
        format!("/jobs/{theirs}"),
        format!("/jobs/{theirs}/images/0"),
        format!("/api/v1/jobs/{theirs}/images/0"),
        format!("/api/v1/events?job={theirs}"),
    ] {
        let a = get(&f, &path, &alice).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.body);
        assert!(!a.body.contains("harbour-study"), "{path}");
    }
    let filtered = get(&f, "/?project=b", &alice).await;
    assert_eq!(rows(&filtered.body), 0, "{}", filtered.body);
    let (bob, _) = login(&f, BOB).await;
    let page = get(&f, "/", &bob).await;
    assert!(page.body.contains("harbour-study") && !page.body.contains("lighthouse-study"));
}

#[tokio::test]
async fn every_post_checks_csrf_role_and_project() {
    let f = farm(true);
    let mine = job(&f, "lighthouse-study", "a", 2).await;
    let theirs = job(&f, "harbour-study", "b", 2).await;
    let (alice, csrf) = login(&f, ALICE).await;
    let cancel = format!("/jobs/{mine}/cancel");
    // No field, or another session's token: refused before anything happens.
    assert_eq!(
        post(&f, &cancel, &alice, "").await.status,
        StatusCode::FORBIDDEN
    );
    let forged = format!("csrf={}", "f".repeat(64));
    assert_eq!(
        post(&f, &cancel, &alice, &forged).await.status,
        StatusCode::FORBIDDEN
    );
    assert!(!f.core.store.job(mine).await.unwrap().is_finished());
    // Another project's job answers as missing.
    let a = post(
        &f,
        &format!("/jobs/{theirs}/cancel"),
        &alice,
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(!f.core.store.job(theirs).await.unwrap().is_finished());
    // A viewer sees the job but gets no button, and the server refuses the POST.
    let (vera, vera_csrf) = login(&f, VIEWER).await;
    let page = get(&f, &format!("/jobs/{mine}"), &vera).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(!page.body.contains("Cancel job"), "{}", page.body);
    let a = post(&f, &cancel, &vera, &format!("csrf={vera_csrf}")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(!f.core.store.job(mine).await.unwrap().is_finished());
    // Alice, with her session's token, cancels her own job.
    let page = get(&f, &format!("/jobs/{mine}"), &alice).await;
    assert!(page.body.contains("Cancel job"), "{}", page.body);
    let a = post(&f, &cancel, &alice, &format!("csrf={csrf}")).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(
        f.core.store.job(mine).await.unwrap().state,
        crate::store::JobState::Cancelled
    );
}

#[tokio::test]
async fn only_an_admin_gets_and_may_press_drain() {
    let f = farm(true);
    let registration = WorkerRegistration {
        assets: crate::store::HeldAssets {
            loras: vec![ModelInfo {
                name: "mira-v3".into(),
                hash: "fedcba9876543210".into(),
            }],
            ..Default::default()
        },
        id: WorkerId("gpu-7".into()),
        labels: [("zone".to_string(), "east".to_string())].into(),
        gpu_memory_bytes: 0,
        slots: 1,
        models: vec![ModelInfo {
            name: "m".into(),
            hash: "0123456789abcdef".into(),
        }],
        determinism_class: "sim/cpu/f32/pipeline-1".into(),
        version: "test".into(),
    };
    f.core
        .store
        .register_worker(registration, None)
        .await
        .unwrap();
    let (alice, csrf) = login(&f, ALICE).await;
    let page = get(&f, "/workers", &alice).await;
    assert!(
        page.body.contains("gpu-7") && page.body.contains("zone=east"),
        "{}",
        page.body
    );
    assert!(page.body.contains("sim/cpu/f32/pipeline-1"));
    assert!(page.body.contains(">lora:mira-v3<"), "{}", page.body);
    assert!(!page.body.contains(">Drain<"));
    let a = post(&f, "/workers/gpu-7/drain", &alice, &format!("csrf={csrf}")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let (root, root_csrf) = login(&f, ADMIN).await;
    assert!(get(&f, "/workers", &root).await.body.contains(">Drain<"));
    let a = post(
        &f,
        "/workers/gpu-7/drain",
        &root,
        &format!("csrf={root_csrf}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(f.core.store.workers().await.unwrap()[0].draining);
}

#[tokio::test]
async fn lists_come_a_page_at_a_time() {
    let f = farm(true);
    for i in 0..(PAGE + 20) {
        job(&f, &format!("job-{i:03}"), "a", 1).await;
    }
    job(&f, "other-project", "b", 1).await;
    let (alice, _) = login(&f, ALICE).await;
    let first = get(&f, "/", &alice).await;
    assert_eq!(rows(&first.body), PAGE);
    assert!(first.body.contains("page=1"), "a link to the next page");
    let second = get(&f, "/?page=1", &alice).await;
    assert_eq!(rows(&second.body), 20);
    assert_eq!(rows(&get(&f, "/?page=2", &alice).await.body), 0);
    // Newest first: the store's order, kept.
    let ids: Vec<String> = f
        .core
        .store
        .jobs(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.project == "a")
        .map(|j| format!("data-job=\"{}\"", j.id))
        .collect();
    let at: Vec<usize> = ids[..PAGE]
        .iter()
        .map(|id| first.body.find(id.as_str()).unwrap())
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "rows in the store's order"
    );
    assert_eq!(rows(&get(&f, "/?state=running", &alice).await.body), PAGE);
    assert_eq!(rows(&get(&f, "/?state=completed", &alice).await.body), 0);
    for bad in ["/?page=x", "/?state=sleeping", "/?project=%20a%20b"] {
        assert_eq!(
            get(&f, bad, &alice).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn the_event_stream_sends_the_live_html_first() {
    let f = farm(true);
    let id = job(&f, "lighthouse-study", "a", 3).await;
    let (alice, _) = login(&f, ALICE).await;
    for path in [
        "/api/v1/events?view=jobs".to_string(),
        format!("/api/v1/events?job={id}"),
    ] {
        let req = Request::get(&path)
            .header(header::COOKIE, &alice)
            .body(Body::empty())
            .unwrap();
        let response = f.router.clone().oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        let text = String::from_utf8_lossy(&first);
        assert!(text.starts_with("event: html\n"), "{path}: {text}");
        assert!(text.contains("0/3"), "{path}: {text}");
    }
    let a = get(&f, "/api/v1/events?view=nothing", &alice).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    f.core.shutdown.cancel();
}

#[tokio::test]
async fn without_auth_the_dashboard_is_open() {
    let f = farm(false);
    job(&f, "open-study", "a", 1).await;
    let page = get(&f, "/", "").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("open-study") && page.body.contains("no --auth"));
    assert!(set_cookie(&page, session::CSRF_COOKIE).is_some());
    assert_eq!(get(&f, "/login", "").await.status, StatusCode::SEE_OTHER);
    assert_eq!(get(&f, "/queue", "").await.status, StatusCode::OK);
}

#[test]
fn thumbnails_keep_the_aspect_within_the_side() {
    let img = image::RgbImage::from_fn(512, 256, |x, _| image::Rgb([(x % 256) as u8, 0, 0]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let small = images::thumbnail(png.get_ref()).unwrap();
    let back = image::load_from_memory(&small).unwrap();
    assert_eq!(
        (back.width(), back.height()),
        (images::THUMB_SIDE, images::THUMB_SIDE / 2)
    );
    assert!(images::thumbnail(b"not a png").is_err());
}

#[test]
fn html_is_escaped() {
    assert_eq!(
        html::esc("<a href=\"x\">&'"),
        "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
    );
}

#[tokio::test]
async fn a_thousand_jobs_and_a_hundred_workers_make_pages_of_fifty() {
    let f = farm(true);
    for i in 0..1000 {
        job(
            &f,
            &format!("job-{i:04}"),
            if i % 2 == 0 { "a" } else { "b" },
            1,
        )
        .await;
    }
    for w in 0..100 {
        let registration = WorkerRegistration {
            assets: Default::default(),
            id: WorkerId(format!("gpu-{w:03}")),
            labels: Default::default(),
            gpu_memory_bytes: 0,
            slots: 1,
            models: vec![ModelInfo {
                name: "m".into(),
                hash: "0123456789abcdef".into(),
            }],
            determinism_class: "sim/v1".into(),
            version: "test".into(),
        };
        f.core
            .store
            .register_worker(registration, None)
            .await
            .unwrap();
    }
    let (root, _) = login(&f, ADMIN).await;
    let jobs = get(&f, "/", &root).await;
    assert_eq!(rows(&jobs.body), PAGE);
    // Twenty pages hold every job once (jobs of one millisecond may come
    // in any order, so the pages are checked as a whole).
    let mut all = String::new();
    for page in 0..20 {
        let a = get(&f, &format!("/?page={page}"), &root).await;
        assert_eq!(rows(&a.body), PAGE, "page {page}");
        assert_eq!(a.body.contains("older &rarr;"), page < 19, "page {page}");
        all.push_str(&a.body);
    }
    for i in 0..1000 {
        assert_eq!(
            all.matches(&format!(">job-{i:04}<")).count(),
            1,
            "job-{i:04}"
        );
    }
    let (alice, _) = login(&f, ALICE).await;
    let scoped = get(&f, "/?page=9", &alice).await;
    assert_eq!(rows(&scoped.body), PAGE, "alice's 500 jobs fill ten pages");
    let workers = get(&f, "/workers", &root).await;
    assert_eq!(workers.body.matches(">Drain<").count(), PAGE);
    assert!(workers.body.contains("gpu-000") && !workers.body.contains("gpu-050"));
    let second = get(&f, "/workers?page=1", &root).await;
    assert!(second.body.contains("gpu-099") && !second.body.contains("gpu-049"));
    for page in [&jobs, &workers] {
        assert!(page.body.len() < 64 * 1024, "{} bytes", page.body.len());
    }
}

#[tokio::test]
async fn a_failed_task_shows_its_attempts_and_retry_puts_it_back() {
    use crate::store::{Fault, JobState, RunningCaps, TaskState};
    use std::time::Duration;
    let f = farm(true);
    let id = job(&f, "doomed-study", "a", 1).await;
    let worker = WorkerId("gpu-1".into());
    let registration = WorkerRegistration {
        assets: Default::default(),
        id: worker.clone(),
        labels: Default::default(),
        gpu_memory_bytes: 0,
        slots: 1,
        models: vec![ModelInfo {
            name: "m".into(),
            hash: String::new(),
        }],
        determinism_class: "sim/v1".into(),
        version: "test".into(),
    };
    let store = &f.core.store;
    store.register_worker(registration, None).await.unwrap();
    let claim = store
        .claim(
            &worker,
            None,
            1,
            Duration::from_secs(30),
            Duration::ZERO,
            &[],
            &[],
            &RunningCaps::new(),
        )
        .await
        .unwrap();
    let lease = &claim.leases[0];
    store
        .fail(
            &worker,
            None,
            lease.task,
            lease.epoch,
            Fault::BadInput,
            "the <mask> is the wrong size",
            3,
        )
        .await
        .unwrap();
    assert_eq!(store.job(id).await.unwrap().state, JobState::Failed);
    let (alice, csrf) = login(&f, ALICE).await;
    let page = get(&f, &format!("/jobs/{id}"), &alice).await;
    assert!(page.body.contains("Failed (1)"), "{}", page.body);
    assert!(
        page.body.contains("the &lt;mask&gt; is the wrong size"),
        "escaped"
    );
    assert!(page.body.contains("bad_input") && page.body.contains("gpu-1"));
    assert!(page.body.contains("Retry failed"));
    let (vera, vera_csrf) = login(&f, VIEWER).await;
    assert!(
        !get(&f, &format!("/jobs/{id}"), &vera)
            .await
            .body
            .contains("Retry failed")
    );
    let refused = post(
        &f,
        &format!("/jobs/{id}/retry"),
        &vera,
        &format!("csrf={vera_csrf}"),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let done = post(
        &f,
        &format!("/jobs/{id}/retry"),
        &alice,
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER);
    let to = done.headers[header::LOCATION].to_str().unwrap();
    assert!(to.contains("done=1+tasks+back"), "{to}");
    assert_eq!(
        store.task(lease.task).await.unwrap().state,
        TaskState::Queued
    );
    assert_eq!(store.job(id).await.unwrap().state, JobState::Running);
}

#[tokio::test]
async fn scripts_may_send_a_bearer_token_instead_of_the_cookie() {
    let f = farm(true);
    let id = job(&f, "lighthouse-study", "a", 1).await;
    let ask = |token: &str| {
        Request::get(format!("/jobs/{id}"))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(send(&f, ask(ALICE)).await.status, StatusCode::OK);
    assert_eq!(send(&f, ask(BOB)).await.status, StatusCode::NOT_FOUND);
    // A header that is there but wrong is refused, whatever cookie comes with it.
    assert_eq!(send(&f, ask("nobody")).await.status, StatusCode::SEE_OTHER);
}
