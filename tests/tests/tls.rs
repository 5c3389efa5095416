//! TLS and mutual TLS between real processes, with certificates made at run
//! time (a CA, a server certificate for `localhost` and 127.0.0.1, a client
//! certificate), and a coordinator on a Redis that requires a password.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::redis::RedisServer;
use kiln_tests::{
    Coordinator, Proc, arg, block, decode_png, https_get, job_id, kiln_env, pngs, sim_worker,
    sweep_file,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// PEM files of a test PKI, in a temporary folder.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Pki {
    fn make(dir: &Path) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kiln test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        server
            .distinguished_name
            .push(DnType::CommonName, "kiln coordinator");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
        client
            .distinguished_name
            .push(DnType::CommonName, "kiln client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client.signed_by(&client_key, &issuer).unwrap();

        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert.pem()),
            client_key: write("client-key.pem", client_key.serialize_pem()),
        }
    }

    /// The coordinator's flags to serve TLS.
    fn server_flags(&self) -> Vec<&str> {
        vec![
            "--tls-cert",
            arg(&self.server_cert),
            "--tls-key",
            arg(&self.server_key),
        ]
    }
}

#[test]
fn a_farm_over_https_renders_and_fetches() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::make(d);
    let coord = Coordinator::start_tls(d, &pki.server_flags(), &[]).unwrap();
    assert!(coord.url.starts_with("https://localhost:"), "{}", coord.url);
    assert!(
        coord.proc.output().contains("tls=\"on\""),
        "{}",
        coord.proc.output()
    );
    let env = [("KILN_CA", arg(&pki.ca))];
    // The HTTP side door shares the TLS port (over HTTP/2, as ALPN says).
    let healthz = block(https_get(&coord.url, &pki.ca, "/healthz")).unwrap();
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "ok\n"));
    let queue = block(https_get(&coord.url, &pki.ca, "/api/v1/queue")).unwrap();
    assert_eq!(queue.status, 200, "{}", queue.body);
    assert!(queue.body.starts_with("{\"models\""), "{}", queue.body);
    let mut worker = sim_worker(d, &coord.url, "w1", &[], &env).unwrap();

    let batch = d.join("batch.toml");
    sweep_file(&batch, "simtoy", 1, 2, 2).unwrap();
    let submit = kiln_env(
        &["submit", arg(&batch), "--json", "--coordinator", &coord.url],
        &env,
    );
    assert_eq!(submit.code, 0, "submit: {}", submit.stderr);
    let job = job_id(&submit.stdout).unwrap();

    let watch = kiln_env(&["watch", &job, "--coordinator", &coord.url], &env);
    assert_eq!(
        watch.code,
        0,
        "watch: {}\n{}\nworker: {}",
        watch.stdout,
        watch.stderr,
        worker.output()
    );
    let out = d.join("out");
    let fetch = kiln_env(
        &[
            "fetch",
            &job,
            "--out",
            arg(&out),
            "--coordinator",
            &coord.url,
        ],
        &env,
    );
    assert_eq!(fetch.code, 0, "fetch: {}", fetch.stderr);
    let files = pngs(&out);
    assert_eq!(files.len(), 2, "{files:?}");
    for f in &files {
        let png = decode_png(f).unwrap();
        assert_eq!((png.width, png.height), (64, 64), "{}", f.display());
    }
    worker.kill();
}

#[test]
fn clients_that_do_not_trust_the_coordinator_or_skip_tls_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::make(d);
    let coord = Coordinator::start_tls(d, &pki.server_flags(), &[]).unwrap();

    // No KILN_CA: the test CA is in no trust store.
    let untrusted = kiln_env(&["jobs", "--coordinator", &coord.url], &[]);
    assert_ne!(untrusted.code, 0, "{}", untrusted.stdout);
    let text = untrusted.stderr.to_lowercase();
    assert!(
        text.contains("certificate") && text.contains("tls"),
        "{}",
        untrusted.stderr
    );

    // Plain HTTP/2 to the TLS port: refused, and quickly.
    let plain = format!("http://127.0.0.1:{}", coord.port());
    let start = Instant::now();
    let out = kiln_env(&["jobs", "--coordinator", &plain], &[]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        out.stderr.contains("cannot reach the coordinator"),
        "{}",
        out.stderr
    );

    // And with the CA the same coordinator answers.
    let trusted = kiln_env(
        &["jobs", "--coordinator", &coord.url],
        &[("KILN_CA", arg(&pki.ca))],
    );
    assert_eq!(trusted.code, 0, "{}", trusted.stderr);
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::make(d);
    let coord = Coordinator::start_tls(
        d,
        &pki.server_flags(),
        &[("KILN_TLS_CLIENT_CA", arg(&pki.ca))],
    )
    .unwrap();
    assert!(
        coord.proc.output().contains("tls=\"mutual\""),
        "{}",
        coord.proc.output()
    );

    let ca_only = [("KILN_CA", arg(&pki.ca))];
    let refused = kiln_env(&["jobs", "--coordinator", &coord.url], &ca_only);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    let text = refused.stderr.to_lowercase();
    assert!(
        text.contains("certificate") && text.contains("tls"),
        "{}",
        refused.stderr
    );

    let with_cert = [
        ("KILN_CA", arg(&pki.ca)),
        ("KILN_TLS_CERT", arg(&pki.client_cert)),
        ("KILN_TLS_KEY", arg(&pki.client_key)),
    ];
    let jobs = kiln_env(&["jobs", "--coordinator", &coord.url], &with_cert);
    assert_eq!(jobs.code, 0, "{}", jobs.stderr);

    // A worker with the client certificate registers.
    let worker = sim_worker(d, &coord.url, "w1", &[], &with_cert).unwrap();
    kiln_tests::wait_for(Duration::from_secs(60), "the worker to register", || {
        let out = kiln_env(
            &["workers", "--json", "--coordinator", &coord.url],
            &with_cert,
        );
        let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        (list.as_array()?.len() == 1).then_some(())
    });
    drop(worker);
}

/// Runs `kiln-coordinator` with `args` until it exits; returns its exit code and output.
fn coordinator_refusal(dir: &Path, name: &str, args: &[&str]) -> (Option<i32>, String) {
    let results = dir.join("results-refused");
    let mut all = vec!["--listen", "127.0.0.1:0", "--results", arg(&results)];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn("kiln-coordinator", &all, &dir.join(format!("{name}.log"))).unwrap();
    let code = proc.wait_exit(Duration::from_secs(60));
    (code, proc.output())
}

#[test]
fn the_coordinator_refuses_incomplete_or_invalid_tls_files_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::make(d);

    let (code, out) = coordinator_refusal(d, "no-key", &["--tls-cert", arg(&pki.server_cert)]);
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(
        out.trim(),
        "kiln-coordinator: --tls-key (KILN_TLS_KEY): is missing: --tls-cert needs its private key"
    );

    let garbage = d.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let (code, out) = coordinator_refusal(
        d,
        "garbage",
        &[
            "--tls-cert",
            arg(&garbage),
            "--tls-key",
            arg(&pki.server_key),
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.contains(arg(&garbage)), "{out}");

    // The client's key is not the server certificate's.
    let (code, out) = coordinator_refusal(
        d,
        "mismatch",
        &[
            "--tls-cert",
            arg(&pki.server_cert),
            "--tls-key",
            arg(&pki.client_key),
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    assert!(out.contains("not a usable pair"), "{out}");
    assert!(!out.contains("PRIVATE KEY"), "{out}");
}

#[test]
fn a_redis_password_works_and_a_wrong_one_fails_without_being_printed() {
    const SECRET: &str = "kiln-test-secret-9f3a";
    const WRONG: &str = "kiln-wrong-secret-4c1d";
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let redis = RedisServer::start_with_password(SECRET).unwrap();
    let url = redis.url();
    assert!(url.contains(SECRET));

    let coord = Coordinator::start(d, &["--store", &url]).unwrap();
    let jobs = kiln_env(&["jobs", "--coordinator", &coord.url], &[]);
    assert_eq!(jobs.code, 0, "{}", jobs.stderr);
    assert!(
        !coord.proc.output().contains(SECRET),
        "{}",
        coord.proc.output()
    );
    drop(coord);

    let wrong = format!("redis://:{WRONG}@127.0.0.1:{}/0", redis.port());
    let (code, log) = coordinator_refusal(d, "wrong", &["--store", &wrong]);
    assert!(matches!(code, Some(c) if c != 0), "{code:?}: {log}");
    assert!(!log.contains(WRONG), "the password was printed: {log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("kiln-coordinator: --store redis://***@127.0.0.1:"),
        "{log}"
    );
    assert!(
        last.to_lowercase().contains("password") || last.contains("WRONGPASS"),
        "{log}"
    );
}

#[test]
fn tokens_work_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::make(d);
    let made = kiln_env(
        &["token", "new", "--name", "ops", "--role", "admin", "--json"],
        &[],
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    let made: serde_json::Value = serde_json::from_str(&made.stdout).unwrap();
    let token = made["token"].as_str().unwrap();
    let auth = d.join("auth.toml");
    std::fs::write(&auth, made["block"].as_str().unwrap()).unwrap();
    let mut flags = pki.server_flags();
    flags.extend_from_slice(&["--auth", arg(&auth)]);
    let coord = Coordinator::start_tls(d, &flags, &[]).unwrap();

    let ca = ("KILN_CA", arg(&pki.ca));
    let out = kiln_env(&["jobs", "--coordinator", &coord.url], &[ca]);
    assert_ne!(out.code, 0, "{}", out.stdout);
    assert!(out.stderr.contains("no token"), "{}", out.stderr);
    let out = kiln_env(
        &["jobs", "--coordinator", &coord.url],
        &[ca, ("KILN_TOKEN", token)],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!coord.proc.output().contains(token));
}

/// A token made by `kiln token new` (the token, its `[[token]]` block).
fn new_token(name: &str, role: &str) -> (String, String) {
    let made = kiln_env(
        &["token", "new", "--name", name, "--role", role, "--json"],
        &[],
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    let made: serde_json::Value = serde_json::from_str(&made.stdout).unwrap();
    (
        made["token"].as_str().unwrap().to_string(),
        made["block"].as_str().unwrap().to_string(),
    )
}

/// A 64x64 PNG that no renderer made.
fn forged_png() -> Vec<u8> {
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(64, 64, image::Rgb([255, 0, 0])))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// Over TLS with real tokens: while worker w1 (token pool-a) is alive, a
/// second worker token can neither start a worker under its id (it exits in
/// one line) nor register, lease, heartbeat, complete or fail under it from
/// a foreign gRPC client; the task it tried to complete with forged bytes
/// keeps w1's image, and w1's own token goes on working.
#[test]
fn a_live_worker_id_belongs_to_the_token_that_registered_it() {
    use kiln_proto::connect::{Bearer, TlsOptions, channel, farm_client, worker_link_client};
    use kiln_proto::pb;
    use sha2::Digest as _;

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::make(d);
    let (admin, admin_block) = new_token("ops", "admin");
    let (pool_a, a_block) = new_token("pool-a", "worker");
    let (pool_b, b_block) = new_token("pool-b", "worker");
    let auth = d.join("auth.toml");
    std::fs::write(&auth, format!("{admin_block}\n{a_block}\n{b_block}\n")).unwrap();
    let mut flags = pki.server_flags();
    flags.extend_from_slice(&["--auth", arg(&auth)]);
    let coord = Coordinator::start_tls(d, &flags, &[]).unwrap();
    let url = coord.url.clone();
    let (a_file, b_file) = (d.join("pool-a.token"), d.join("pool-b.token"));
    std::fs::write(&a_file, &pool_a).unwrap();
    std::fs::write(&b_file, &pool_b).unwrap();
    // Slow enough that the foreign calls below find a task leased to w1.
    let mut w1 = kiln_tests::worker(
        d,
        &url,
        "w1",
        &[
            "--renderer",
            "sim",
            "--model",
            "simtoy",
            "--sim-step",
            "1s",
            "--ca",
            arg(&pki.ca),
            "--token-file",
            arg(&a_file),
        ],
    )
    .unwrap();
    let env = [("KILN_CA", arg(&pki.ca)), ("KILN_TOKEN", admin.as_str())];
    wait_for_workers_as(&url, &env, "w1");

    // A worker process under pool-b with w1's id stops at once, in one line.
    let impostor_dir = d.join("impostor");
    std::fs::create_dir(&impostor_dir).unwrap();
    let mut impostor = sim_worker(
        &impostor_dir,
        &url,
        "w1",
        &["--token-file", arg(&b_file)],
        &[("KILN_CA", arg(&pki.ca))],
    )
    .unwrap();
    let code = impostor.wait_exit(Duration::from_secs(30));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}: {}",
        impostor.output()
    );
    let said: Vec<String> = impostor
        .output()
        .lines()
        .filter(|l| l.contains("registered by another token"))
        .map(str::to_string)
        .collect();
    assert_eq!(said.len(), 1, "{}", impostor.output());
    assert!(said[0].contains("worker id w1"), "{}", said[0]);

    let batch = d.join("batch.toml");
    sweep_file(&batch, "simtoy", 1, 2, 2).unwrap();
    let submit = kiln_env(
        &["submit", arg(&batch), "--json", "--coordinator", &url],
        &env,
    );
    assert_eq!(submit.code, 0, "submit: {}", submit.stderr);
    let job = job_id(&submit.stdout).unwrap();

    let tls = TlsOptions {
        ca: Some(pki.ca.clone()),
        ..Default::default()
    };
    kiln_tests::block(async {
        let ch = channel("url", &url, &tls).unwrap();
        let mut farm = farm_client(ch.clone(), Bearer::new(&admin).unwrap());
        let mut as_b = worker_link_client(ch.clone(), Bearer::new(&pool_b).unwrap());
        let mut as_a = worker_link_client(ch, Bearer::new(&pool_a).unwrap());
        let get = pb::GetJobRequest {
            job_id: job.clone(),
            include_tasks: true,
        };
        // A task w1 holds now.
        let deadline = Instant::now() + Duration::from_secs(60);
        let held = loop {
            let tasks = farm.get_job(get.clone()).await.unwrap().into_inner().tasks;
            if let Some(t) = tasks
                .into_iter()
                .find(|t| t.state == pb::TaskState::Leased as i32)
            {
                break t;
            }
            assert!(Instant::now() < deadline, "w1 never leased a task");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let epoch = held.attempts.last().unwrap().epoch;

        let denied = |what: &str, status: tonic::Status| {
            assert_eq!(
                status.code(),
                tonic::Code::PermissionDenied,
                "{what}: {status:?}"
            );
            assert_eq!(
                status.message(),
                "worker id w1 is registered by another token",
                "{what}"
            );
            assert!(!status.message().contains(&pool_a) && !status.message().contains(&pool_b));
        };
        let register = pb::RegisterRequest {
            worker_id: "w1".into(),
            slots: 1,
            models: vec![pb::ModelInfo {
                name: "simtoy".into(),
                hash: "forged".into(),
            }],
            ..Default::default()
        };
        denied("register", as_b.register(register).await.unwrap_err());
        let lease = pb::LeaseRequest {
            worker_id: "w1".into(),
            max_tasks: 1,
            wait_ms: 0,
            resident_models: vec![],
            ready_lora_sets: vec![],
        };
        denied("lease", as_b.lease(lease).await.unwrap_err());
        let beat = pb::HeartbeatRequest {
            worker_id: "w1".into(),
            tasks: vec![pb::LeaseProgress {
                task_id: held.task_id.clone(),
                epoch,
                step: 1,
                ..Default::default()
            }],
        };
        denied("heartbeat", as_b.heartbeat(beat.clone()).await.unwrap_err());
        let png = forged_png();
        let forged_sha = hex::encode(sha2::Sha256::digest(&png));
        let complete = pb::CompleteRequest {
            worker_id: "w1".into(),
            task_id: held.task_id.clone(),
            epoch,
            sha256: forged_sha.clone(),
            png,
            model_hash: "forged".into(),
            timings: None,
            ..Default::default()
        };
        denied("complete", as_b.complete(complete).await.unwrap_err());
        let fail = pb::FailRequest {
            worker_id: "w1".into(),
            task_id: held.task_id.clone(),
            epoch,
            fault: pb::FaultClass::Internal as i32,
            message: "forged".into(),
        };
        denied("fail", as_b.fail(fail).await.unwrap_err());
        // The owner's token is not refused.
        as_a.heartbeat(pb::HeartbeatRequest {
            worker_id: "w1".into(),
            tasks: vec![],
        })
        .await
        .expect("w1's own token");

        // The job completes on w1; the task kept w1's render, not the forgery.
        let deadline = Instant::now() + Duration::from_secs(120);
        let done = loop {
            let got = farm.get_job(get.clone()).await.unwrap().into_inner();
            if got.job.as_ref().unwrap().state != pb::JobState::Running as i32 {
                break got;
            }
            assert!(Instant::now() < deadline, "the job never finished");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            done.job.unwrap().state,
            pb::JobState::Completed as i32,
            "{}",
            w1.output()
        );
        let task = done
            .tasks
            .iter()
            .find(|t| t.task_id == held.task_id)
            .unwrap();
        assert_ne!(task.sha256, forged_sha);
        assert!(
            task.attempts.iter().all(|a| a.worker_id == "w1"),
            "{:?}",
            task.attempts
        );
        assert_eq!(task.attempts.len(), 1, "the forged fail changed nothing");
    });
    w1.kill();
    for log in [coord.proc.output(), w1.output(), impostor.output()] {
        for t in [&admin, &pool_a, &pool_b] {
            assert!(!log.contains(t.as_str()), "a log holds a token");
        }
    }
}

/// Waits until `kiln workers` (with `env`) lists `id`.
fn wait_for_workers_as(url: &str, env: &[(&str, &str)], id: &str) {
    kiln_tests::wait_for(Duration::from_secs(60), "the worker to register", || {
        let out = kiln_env(&["workers", "--json", "--coordinator", url], env);
        let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        list.as_array()?
            .iter()
            .any(|w| w["worker_id"] == id)
            .then_some(())
    });
}
