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
