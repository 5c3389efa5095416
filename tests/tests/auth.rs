//! Tokens, roles and projects between real processes: tokens made with
//! `kiln token new`, an auth file, a coordinator started with `--auth`, sim
//! workers and `kiln` calls with `KILN_TOKEN` or `--token-file`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_tests::{
    Coordinator, Output, Proc, arg, binary, job_id, kiln, kiln_env, sim_worker, sweep_file,
    wait_for,
};

/// A token made by `kiln token new`, with its `[[token]]` block.
struct Token {
    token: String,
    block: String,
}

fn new_token(name: &str, role: &str, projects: &[&str]) -> Token {
    let mut args = vec!["token", "new", "--name", name, "--role", role, "--json"];
    for p in projects {
        args.extend_from_slice(&["--project", p]);
    }
    let out = kiln(&args);
    assert_eq!(out.code, 0, "token new: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    assert!(token.len() >= 64, "{token}");
    Token {
        token,
        block: v["block"].as_str().unwrap().to_string(),
    }
}

/// Runs `kiln` against `url` with `token` in KILN_TOKEN (none: no token).
fn kiln_as(token: Option<&Token>, url: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--coordinator", url]);
    match token {
        Some(t) => kiln_env(&all, &[("KILN_TOKEN", &t.token)]),
        None => kiln_env(&all, &[]),
    }
}

/// A batch of `n` sim tasks, in `project` when given.
fn batch(dir: &Path, name: &str, project: Option<&str>, n: usize) -> PathBuf {
    let path = dir.join(name);
    sweep_file(&path, "simtoy", 1, n, 2).unwrap();
    if let Some(p) = project {
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("project = \"{p}\"\n{text}")).unwrap();
    }
    path
}

fn job_ids(out: &Output) -> Vec<String> {
    assert_eq!(out.code, 0, "jobs: {}", out.stderr);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap().to_string())
        .collect()
}

fn refused(out: &Output, says: &str) {
    assert_ne!(out.code, 0, "expected a refusal: {}", out.stdout);
    assert!(
        out.stderr.contains(says),
        "expected {says:?} in: {}",
        out.stderr
    );
}

fn log_text(dir: &Path) -> Vec<(PathBuf, String)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            (p, text)
        })
        .collect()
}

#[test]
fn tokens_roles_projects_quotas_and_reload() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let admin = new_token("ops-admin", "admin", &[]);
    let sub_a = new_token("studio-a-pipeline", "submitter", &["a"]);
    let sub_b = new_token("studio-b-pipeline", "submitter", &["b"]);
    let viewer_a = new_token("studio-a-viewer", "viewer", &["a"]);
    let worker = new_token("render-nodes", "worker", &[]);
    let auth = d.join("auth.toml");
    let table = format!(
        "{}\n{}\n{}\n{}\n{}\n[[project]]\nname = \"b\"\nmax_queued_tasks = 5\nmax_running_tasks = 2\nmax_tasks_per_job = 100\n\n[[project]]\nname = \"c\"\nmax_tasks_per_job = 4\n",
        admin.block, sub_a.block, sub_b.block, viewer_a.block, worker.block
    );
    std::fs::write(&auth, &table).unwrap();
    let coord = Coordinator::start(d, &["--auth", arg(&auth)]).unwrap();
    let url = coord.url.clone();

    // No token, and a made-up one: refused, saying why.
    let out = kiln_as(None, &url, &["jobs"]);
    refused(&out, "no token");
    assert!(out.stderr.contains("KILN_TOKEN"), "{}", out.stderr);
    let made_up = Token {
        token: "kiln_0000000000000000000000000000000000000000000000000000000000000000".into(),
        block: String::new(),
    };
    refused(&kiln_as(Some(&made_up), &url, &["jobs"]), "unknown token");

    // A worker with its token from --token-file registers and renders.
    let worker_file = d.join("worker.token");
    std::fs::write(&worker_file, format!("{}\n", worker.token)).unwrap();
    let mut w1 = sim_worker(d, &url, "w1", &["--token-file", arg(&worker_file)], &[]).unwrap();
    wait_for(Duration::from_secs(60), "the worker to register", || {
        let out = kiln_as(Some(&admin), &url, &["workers", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        (!list.as_array()?.is_empty()).then_some(())
    });
    // ListWorkers is open to every role.
    for t in [&sub_a, &viewer_a, &worker] {
        assert_eq!(kiln_as(Some(t), &url, &["workers"]).code, 0);
    }

    // Submitter a submits to its only project by default; the job renders.
    let plain = batch(d, "a.toml", None, 2);
    let out = kiln_as(Some(&sub_a), &url, &["submit", arg(&plain), "--json"]);
    assert_eq!(out.code, 0, "submit: {}", out.stderr);
    let job_a = job_id(&out.stdout).unwrap();
    let watch = kiln_as(Some(&sub_a), &url, &["watch", &job_a]);
    assert_eq!(watch.code, 0, "watch: {}\n{}", watch.stderr, w1.output());
    let jobs: serde_json::Value =
        serde_json::from_str(&kiln_as(Some(&sub_a), &url, &["jobs", "--json"]).stdout).unwrap();
    assert_eq!(jobs[0]["project"], "a", "{jobs}");

    // Submitter b neither sees nor touches it: answered like a missing job.
    assert!(!job_ids(&kiln_as(Some(&sub_b), &url, &["jobs", "--json"])).contains(&job_a));
    let missing = "0190b7a2-0000-7000-8000-000000000000";
    let not_there = kiln_as(Some(&sub_b), &url, &["cancel", missing]);
    refused(&not_there, "not found");
    for cmd in [
        vec!["watch", job_a.as_str()],
        vec!["fetch", job_a.as_str(), "--out", arg(&d.join("b-out"))],
        vec!["cancel", job_a.as_str()],
    ] {
        let out = kiln_as(Some(&sub_b), &url, &cmd);
        refused(&out, "not found");
        assert_eq!(
            out.stderr.replace(&job_a, "ID"),
            not_there.stderr.replace(missing, "ID"),
            "{cmd:?}"
        );
    }

    // Submitter a may not submit to b; a worker and a viewer may not submit.
    let to_b = batch(d, "to-b.toml", Some("b"), 1);
    refused(
        &kiln_as(Some(&sub_a), &url, &["submit", arg(&to_b)]),
        "permission denied",
    );
    let out = kiln_as(Some(&worker), &url, &["submit", arg(&plain)]);
    refused(&out, "permission denied");
    assert!(out.stderr.contains("--token-file"), "{}", out.stderr);
    refused(
        &kiln_as(Some(&worker), &url, &["jobs"]),
        "permission denied",
    );
    assert!(job_ids(&kiln_as(Some(&viewer_a), &url, &["jobs", "--json"])).contains(&job_a));
    refused(
        &kiln_as(Some(&viewer_a), &url, &["submit", arg(&plain)]),
        "permission denied",
    );
    refused(
        &kiln_as(Some(&viewer_a), &url, &["cancel", &job_a]),
        "permission denied",
    );
    refused(
        &kiln_as(Some(&sub_a), &url, &["drain", "w1"]),
        "permission denied",
    );

    // The admin sees and cancels a's job; the audit line names the token.
    assert!(job_ids(&kiln_as(Some(&admin), &url, &["jobs", "--json"])).contains(&job_a));
    let out = kiln_as(Some(&admin), &url, &["cancel", &job_a]);
    assert_eq!(out.code, 0, "cancel: {}", out.stderr);
    wait_for(Duration::from_secs(10), "the audit line", || {
        coord
            .proc
            .output()
            .lines()
            .any(|l| l.contains("kiln::audit") && l.contains("ops-admin") && l.contains(&job_a))
            .then_some(())
    });

    // Quota: 10 tasks over max_queued_tasks = 5 are refused; 3 are taken.
    let ten = batch(d, "ten.toml", None, 10);
    let out = kiln_as(Some(&sub_b), &url, &["submit", arg(&ten)]);
    refused(&out, "max_queued_tasks is 5");
    assert!(out.stderr.contains("this job adds 10"), "{}", out.stderr);
    let to_c = batch(d, "to-c.toml", Some("c"), 10);
    let out = kiln_as(Some(&admin), &url, &["submit", arg(&to_c)]);
    refused(&out, "project c: max_tasks_per_job is 4, this job adds 10");
    let three = batch(d, "three.toml", None, 3);
    let out = kiln_as(Some(&sub_b), &url, &["submit", arg(&three), "--json"]);
    assert_eq!(out.code, 0, "submit 3 to b: {}", out.stderr);
    let job_b = job_id(&out.stdout).unwrap();
    assert_eq!(kiln_as(Some(&sub_b), &url, &["watch", &job_b]).code, 0);

    // A worker with a submitter's token stops at once, in one line.
    let sub_file = d.join("submitter.token");
    std::fs::write(&sub_file, &sub_a.token).unwrap();
    let mut bad = sim_worker(d, &url, "w-bad", &["--token-file", arg(&sub_file)], &[]).unwrap();
    let code = bad.wait_exit(Duration::from_secs(30));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}: {}",
        bad.output()
    );
    assert!(
        bad.output().contains("refused worker w-bad's token"),
        "{}",
        bad.output()
    );

    // SIGHUP: a token added to the file works without a restart; a broken
    // file keeps the tokens in force.
    let late = new_token("late-viewer", "viewer", &["*"]);
    refused(&kiln_as(Some(&late), &url, &["jobs"]), "unknown token");
    std::fs::write(&auth, format!("{table}\n{}", late.block)).unwrap();
    coord.proc.signal("HUP");
    wait_for(Duration::from_secs(10), "the reload", || {
        (kiln_as(Some(&late), &url, &["jobs"]).code == 0).then_some(())
    });
    std::fs::write(&auth, "[[token]]\nname = \"x\"\n").unwrap();
    coord.proc.signal("HUP");
    wait_for(Duration::from_secs(10), "the failed reload", || {
        coord
            .proc
            .output()
            .contains("auth file reload failed")
            .then_some(())
    });
    assert_eq!(kiln_as(Some(&late), &url, &["jobs"]).code, 0);

    // A worker whose token is taken away stops at its next lease, in one line.
    let without_worker = table.replace(&worker.block, "");
    std::fs::write(&auth, format!("{without_worker}\n{}", late.block)).unwrap();
    coord.proc.signal("HUP");
    let code = w1.wait_exit(Duration::from_secs(40));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}: {}",
        w1.output()
    );
    assert!(
        w1.output().contains("refused worker w1's token on Lease"),
        "{}",
        w1.output()
    );

    // No token in any log.
    w1.kill();
    for (path, text) in log_text(d) {
        for t in [&admin, &sub_a, &sub_b, &viewer_a, &worker, &late, &made_up] {
            assert!(!text.contains(&t.token), "{} holds a token", path.display());
        }
    }
}

#[test]
fn without_auth_a_public_address_needs_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let results = d.join("results");
    let start = Instant::now();
    let out = Command::new(binary("kiln-coordinator"))
        .args(["--listen", "0.0.0.0:0", "--results", arg(&results)])
        .env_remove("KILN_AUTH")
        .output()
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 without --auth")
            && stderr.contains("--insecure"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let log = d.join("insecure.log");
    let mut proc = Proc::spawn(
        "kiln-coordinator",
        &[
            "--listen",
            "0.0.0.0:0",
            "--results",
            arg(&results),
            "--insecure",
        ],
        &log,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the coordinator to listen", || {
        proc.output()
            .contains("coordinator listening")
            .then_some(())
    });
    proc.kill();
}

/// `max_running_tasks = 1`: with two sim workers, never more than one task
/// of the capped project is leased at once (sampled with a foreign gRPC
/// client, one consistent worker listing per sample), while the other
/// project's tasks go to the other worker; both jobs complete.
#[test]
fn max_running_tasks_caps_a_projects_leases() {
    use kiln_proto::connect::{Bearer, channel, farm_client};
    use kiln_proto::pb;

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let admin = new_token("ops-admin", "admin", &[]);
    let worker = new_token("render-nodes", "worker", &[]);
    let auth = d.join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "{}\n{}\n[[project]]\nname = \"capped\"\nmax_running_tasks = 1\n",
            admin.block, worker.block
        ),
    )
    .unwrap();
    let coord = Coordinator::start(d, &["--auth", arg(&auth)]).unwrap();
    let url = coord.url.clone();
    let worker_file = d.join("worker.token");
    std::fs::write(&worker_file, &worker.token).unwrap();
    let _workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|id| {
            kiln_tests::worker(
                d,
                &url,
                id,
                &[
                    "--renderer",
                    "sim",
                    "--model",
                    "simtoy",
                    "--sim-step",
                    "150ms",
                    "--token-file",
                    arg(&worker_file),
                ],
            )
            .unwrap()
        })
        .collect();
    wait_for(Duration::from_secs(60), "both workers to register", || {
        let out = kiln_as(Some(&admin), &url, &["workers", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        (list.as_array()?.len() == 2).then_some(())
    });
    // More capped work than free work: once the free job is done, both
    // workers would take capped tasks if nothing held them back.
    let submit = |name: &str, project: &str, n: usize| {
        let file = batch(d, name, Some(project), n);
        let out = kiln_as(Some(&admin), &url, &["submit", arg(&file), "--json"]);
        assert_eq!(out.code, 0, "submit: {}", out.stderr);
        job_id(&out.stdout).unwrap()
    };
    let capped = submit("capped.toml", "capped", 8);
    let free = submit("free.toml", "free", 3);

    kiln_tests::block(async {
        let ch = channel("url", &url, &Default::default()).unwrap();
        let farm = farm_client(ch, Bearer::new(&admin.token).unwrap());
        let task_ids = |job: &str| {
            let mut farm = farm.clone();
            let job = job.to_string();
            async move {
                let got = farm
                    .get_job(pb::GetJobRequest {
                        job_id: job,
                        include_tasks: true,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                got.tasks
                    .into_iter()
                    .map(|t| t.task_id)
                    .collect::<std::collections::HashSet<_>>()
            }
        };
        let (capped_tasks, free_tasks) = (task_ids(&capped).await, task_ids(&free).await);
        let state = |job: &str| {
            let mut farm = farm.clone();
            let job = job.to_string();
            async move {
                farm.get_job(pb::GetJobRequest {
                    job_id: job,
                    include_tasks: false,
                })
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap()
                .state
            }
        };
        let running = pb::JobState::Running as i32;
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut samples, mut side_by_side) = (0, false);
        while state(&capped).await == running || state(&free).await == running {
            assert!(Instant::now() < deadline, "the jobs never finished");
            let workers = farm
                .clone()
                .list_workers(pb::ListWorkersRequest::default())
                .await
                .unwrap()
                .into_inner()
                .workers;
            let leased = |tasks: &std::collections::HashSet<String>| {
                workers
                    .iter()
                    .flat_map(|w| &w.running_task_ids)
                    .filter(|t| tasks.contains(*t))
                    .count()
            };
            let (c, f) = (leased(&capped_tasks), leased(&free_tasks));
            assert!(c <= 1, "{c} tasks of the capped project leased at once");
            side_by_side |= c == 1 && f >= 1;
            samples += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(samples > 10, "only {samples} samples");
        assert!(
            side_by_side,
            "the free project never ran beside the capped one"
        );
        for job in [&capped, &free] {
            assert_eq!(state(job).await, pb::JobState::Completed as i32, "{job}");
        }
    });
}
