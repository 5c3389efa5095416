//! The Store conformance suite: every test is a generic async function over
//! `&dyn Store`, and each backend instantiates the whole suite with one line
//! of [`store_conformance!`], so both stores keep the same semantics.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};
use kiln_proto::recipe::{Recipe, Scheduler};

use super::*;

const TTL: Duration = Duration::from_secs(30);
const NO_WAIT: Duration = Duration::ZERO;
/// No project capped.
static NO_CAPS: RunningCaps = RunningCaps::new();

fn recipe(model: &str, seed: u64) -> Recipe {
    Recipe {
        model: model.into(),
        model_hash: String::new(),
        prompt: format!("prompt {seed}"),
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

pub(crate) fn new_job(n: u32, model: &str) -> NewJob {
    NewJob {
        id: JobId::new(),
        name: "test".into(),
        project: "default".into(),
        priority: 0,
        idempotency_key: None,
        tasks: (0..n)
            .map(|i| NewTask {
                id: TaskId::new(),
                index: i,
                recipe: recipe(model, u64::from(i)),
                file_name: format!("{i:05}-prompt.png"),
                series: None,
                avoid: Vec::new(),
            })
            .collect(),
        blobs: Vec::new(),
        pin_class: false,
        class: None,
        dedupe: true,
        verify_of: None,
        traceparent: None,
        notify: Vec::new(),
        submitted_by: None,
    }
}

fn worker(id: &str) -> WorkerId {
    WorkerId(id.into())
}

pub(crate) fn registration(id: &str, models: &[&str]) -> WorkerRegistration {
    WorkerRegistration {
        id: worker(id),
        labels: BTreeMap::new(),
        gpu_memory_bytes: 0,
        slots: 2,
        models: models
            .iter()
            .map(|m| ModelInfo {
                name: m.to_string(),
                hash: format!("hash-of-{m}"),
            })
            .collect(),
        determinism_class: "cpu-f32".into(),
        version: "test".into(),
        assets: Default::default(),
    }
}

fn result() -> TaskResult {
    TaskResult {
        object: "job/.staging/x.png".into(),
        sha256: "00".repeat(32),
        size: 10,
        model_hash: "hash-of-tiny".into(),
        render_ms: 5,
        encode_ms: 1,
        class: String::new(),
    }
}

pub(crate) async fn claim(store: &dyn Store, w: &str, max: usize) -> Vec<Lease> {
    store
        .claim(&worker(w), None, max, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .expect("claim")
        .leases
}

/// A worker holding `tiny` and the LoRAs and ControlNets given as (name, hash).
fn with_assets(
    id: &str,
    loras: &[(&str, &str)],
    controlnets: &[(&str, &str)],
) -> WorkerRegistration {
    let info = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(name, hash)| ModelInfo {
                name: (*name).into(),
                hash: (*hash).into(),
            })
            .collect()
    };
    let mut r = registration(id, &["tiny"]);
    r.assets = HeldAssets {
        loras: info(loras),
        embeddings: Vec::new(),
        controlnets: info(controlnets),
    };
    r
}

/// A recipe of `tiny` with the LoRA `name` (hash `hash`) at weight 0.8, or
/// plain when `name` is empty.
fn with_lora(seed: u64, name: &str, hash: &str) -> Recipe {
    let mut r = recipe("tiny", seed);
    if !name.is_empty() {
        r.extras.loras = vec![kiln_proto::extras::LoraRef {
            name: name.into(),
            hash: hash.into(),
            unet_weight: 0.8,
            te_weight: 0.8,
        }];
    }
    r
}

/// Claims up to `max` tasks for `w`, which reports `ready` LoRA sets of `tiny`.
async fn claim_ready(store: &dyn Store, w: &str, max: usize, ready: &[&Recipe]) -> Vec<TaskId> {
    let ready: Vec<kiln_proto::lora_set::ReadyLoraSet> = ready
        .iter()
        .map(|r| kiln_proto::lora_set::ReadyLoraSet {
            model: "tiny".into(),
            set: policy::task_lora_set(r),
        })
        .collect();
    store
        .claim(&worker(w), None, max, TTL, NO_WAIT, &[], &ready, &NO_CAPS)
        .await
        .expect("claim")
        .leases
        .iter()
        .map(|l| l.task)
        .collect()
}

/// LoRA-set affinity (policy step 4): a worker takes first a task of the
/// chosen job and model whose LoRA set it holds ready, never a task of a
/// lower-priority job, never passing over a task without LoRAs.
async fn a_worker_prefers_tasks_whose_lora_set_it_holds_ready(store: &dyn Store) {
    let loras = [("ink", "h1"), ("mira", "h2")];
    for w in ["wa", "wb", "wc"] {
        store
            .register_worker(with_assets(w, &loras, &[]), None)
            .await
            .unwrap();
    }
    let (ink, mira) = (with_lora(100, "ink", "h1"), with_lora(100, "mira", "h2"));
    let mut a = new_job(6, "tiny");
    for (i, name) in ["ink", "mira", "ink", "mira", "", "mira"]
        .iter()
        .enumerate()
    {
        let hash = if *name == "ink" { "h1" } else { "h2" };
        a.tasks[i].recipe = with_lora(i as u64, name, hash);
    }
    let ids: Vec<TaskId> = a.tasks.iter().map(|t| t.id).collect();
    let mut b = new_job(1, "tiny");
    b.priority = 1;
    b.tasks[0].recipe = with_lora(50, "mira", "h2");
    let b0 = b.tasks[0].id;
    store.create_job(a).await.unwrap();
    store.create_job(b).await.unwrap();
    assert_eq!(
        claim_ready(store, "wa", 1, &[&ink]).await,
        [b0],
        "priority first, whatever is ready"
    );
    assert_eq!(
        claim_ready(store, "wb", 1, &[&mira]).await,
        [ids[1]],
        "past the ink head to the first mira task"
    );
    assert_eq!(claim_ready(store, "wa", 1, &[&ink]).await, [ids[0]]);
    assert_eq!(claim_ready(store, "wb", 1, &[&mira]).await, [ids[3]]);
    assert_eq!(
        claim_ready(store, "wc", 1, &[]).await,
        [ids[2]],
        "nothing ready: item order"
    );
    assert_eq!(
        claim_ready(store, "wa", 1, &[&ink]).await,
        [ids[4]],
        "a task without LoRAs is never passed over"
    );
    assert_eq!(
        claim_ready(store, "wa", 1, &[&ink]).await,
        [ids[5]],
        "no ready task: the head, merged"
    );
}

/// Batch filling (policy step 5): after the first task's UNet batch, free
/// slots take tasks whose LoRA set is ready on the worker or is the first
/// task's, then the rest of the model's tasks.
async fn free_slots_take_tasks_with_ready_lora_sets_next(store: &dyn Store) {
    let loras = [("ink", "h1"), ("mira", "h2")];
    for w in ["wa", "wd"] {
        store
            .register_worker(with_assets(w, &loras, &[]), None)
            .await
            .unwrap();
    }
    let ink = with_lora(100, "ink", "h1");
    // 0: mira; 1: ink; 2: ink at another size (another batch); 3: plain; 4: ink.
    let mut c = new_job(5, "tiny");
    for (i, name) in ["mira", "ink", "ink", "", "ink"].iter().enumerate() {
        let hash = if *name == "ink" { "h1" } else { "h2" };
        c.tasks[i].recipe = with_lora(i as u64, name, hash);
    }
    c.tasks[2].recipe.width = 128;
    let ids: Vec<TaskId> = c.tasks.iter().map(|t| t.id).collect();
    store.create_job(c).await.unwrap();
    assert_eq!(
        claim_ready(store, "wa", 4, &[&ink]).await,
        [ids[1], ids[4], ids[2], ids[0]],
        "ink first, its batch, ink at 128 px, then the rest in item order"
    );
    // Nothing reported ready: the first task's own set counts as ready.
    let mut d = new_job(3, "tiny");
    for (i, name) in ["mira", "", "mira"].iter().enumerate() {
        d.tasks[i].recipe = with_lora(10 + i as u64, name, "h2");
    }
    d.tasks[2].recipe.width = 128;
    let ids: Vec<TaskId> = d.tasks.iter().map(|t| t.id).collect();
    store.create_job(d).await.unwrap();
    assert_eq!(
        claim_ready(store, "wd", 3, &[]).await,
        [ids[0], ids[2], ids[1]]
    );
}

/// Tasks go only to workers holding every LoRA and ControlNet they name with
/// the same hash (`policy::task_needs`); a quarantined worker's stand-in must
/// hold them too; and tasks with other extras never share a UNet batch.
async fn tasks_go_only_to_workers_holding_their_assets(store: &dyn Store) {
    use kiln_proto::extras::{ControlNetRef, LoraRef, ResizeMode};
    let lora = |name: &str, hash: &str| LoraRef {
        name: name.into(),
        hash: hash.into(),
        unet_weight: 1.0,
        te_weight: 1.0,
    };
    store
        .register_worker(with_assets("plain", &[], &[]), None)
        .await
        .unwrap();
    store
        .register_worker(with_assets("other", &[("ink", "h2")], &[]), None)
        .await
        .unwrap();
    let mut job = new_job(4, "tiny");
    // 0: LoRA ink (h1); 1: ink (h1) and ControlNet pose; 2: nothing; 3: ink (h1).
    job.tasks[0].recipe.extras.loras = vec![lora("ink", "h1")];
    job.tasks[1].recipe.extras.loras = vec![lora("ink", "h1")];
    job.tasks[1].recipe.extras.controlnets = vec![ControlNetRef {
        model: "pose".into(),
        hash: "c1".into(),
        image: "ab".repeat(32),
        scale: 1.0,
        start: 0.0,
        end: 1.0,
        resize: ResizeMode::Crop,
        preprocess: None,
    }];
    job.tasks[3].recipe.extras.loras = vec![lora("ink", "h1")];
    let ids: Vec<TaskId> = job.tasks.iter().map(|t| t.id).collect();
    store.create_job(job).await.unwrap();
    // Neither holds ink under h1: only the plain task goes, to either.
    let got = claim(store, "other", 4).await;
    assert_eq!(
        got.iter().map(|l| l.task).collect::<Vec<_>>(),
        vec![ids[2]],
        "another hash of ink is no match"
    );
    assert!(claim(store, "plain", 4).await.is_empty());
    store
        .register_worker(with_assets("lora", &[("ink", "h1")], &[]), None)
        .await
        .unwrap();
    // Tasks 0 and 3 share a batch key; task 1 needs the ControlNet too.
    let got = claim(store, "lora", 4).await;
    assert_eq!(
        got.iter().map(|l| l.task).collect::<Vec<_>>(),
        vec![ids[0], ids[3]]
    );
    store
        .register_worker(
            with_assets("both", &[("ink", "h1")], &[("pose", "c1")]),
            None,
        )
        .await
        .unwrap();
    assert!(claim(store, "lora", 4).await.is_empty());
    let got = claim(store, "both", 4).await;
    assert_eq!(got.iter().map(|l| l.task).collect::<Vec<_>>(), vec![ids[1]]);
    assert_eq!(got[0].recipe.extras.controlnets[0].hash, "c1");
}

/// A job with webhook targets and `n` tasks.
fn notifying_job(n: u32, targets: &[&str]) -> NewJob {
    let mut job = new_job(n, "tiny");
    job.notify = targets.iter().map(|t| t.to_string()).collect();
    job
}

async fn a_delivery_opens_when_a_notifying_job_ends(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let (job, _) = store
        .create_job(notifying_job(
            1,
            &["https://a.example/", "https://b.example/"],
        ))
        .await
        .unwrap();
    let (quiet, _) = store.create_job(new_job(1, "tiny")).await.unwrap();
    let mut leases = claim(store, "w1", 2).await;
    if leases.len() < 2 {
        leases.extend(claim(store, "w1", 2).await);
    }
    assert_eq!(leases.len(), 2);
    leases.sort_by_key(|l| l.job == quiet.id);
    let lease = &leases[0];
    assert_eq!(lease.job, job.id);
    assert_eq!(
        store.claim_deliveries(10, TTL).await.unwrap(),
        [],
        "nothing to deliver while the job runs"
    );
    for l in &leases {
        store
            .complete(&worker("w1"), None, l.task, l.epoch, result())
            .await
            .unwrap();
    }
    // Only the job with targets has a delivery.
    let due = store.claim_deliveries(10, TTL).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].job, job.id);
    assert_eq!(due[0].attempt, 1);
    assert_eq!(due[0].pending, ["https://a.example/", "https://b.example/"]);
    assert!(due[0].age < Duration::from_secs(60));
    assert_eq!(
        store.claim_deliveries(10, TTL).await.unwrap(),
        [],
        "a claimed delivery is not handed out twice"
    );
    // One target answered: the other is retried, due at once here.
    store
        .settle_delivery(
            job.id,
            1,
            &["https://a.example/".into()],
            Some(Duration::ZERO),
        )
        .await
        .unwrap();
    let due = store.claim_deliveries(10, TTL).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].attempt, 2);
    assert_eq!(due[0].pending, ["https://b.example/"]);
    store
        .settle_delivery(job.id, 2, &["https://b.example/".into()], None)
        .await
        .unwrap();
    assert_eq!(store.claim_deliveries(10, TTL).await.unwrap(), []);
    // Settling a closed delivery changes nothing.
    store
        .settle_delivery(job.id, 2, &[], Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(store.claim_deliveries(10, TTL).await.unwrap(), []);
}

async fn a_cancelled_or_failed_job_delivers_too(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let (cancelled, _) = store
        .create_job(notifying_job(2, &["https://c.example/"]))
        .await
        .unwrap();
    store.cancel_job(cancelled.id).await.unwrap();
    let due = store.claim_deliveries(10, TTL).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].job, cancelled.id);
    store
        .settle_delivery(cancelled.id, 1, &due[0].pending, None)
        .await
        .unwrap();
    let (failed, _) = store
        .create_job(notifying_job(1, &["https://f.example/"]))
        .await
        .unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    store
        .fail(
            &worker("w1"),
            None,
            lease.task,
            lease.epoch,
            Fault::BadInput,
            "no",
            5,
        )
        .await
        .unwrap();
    assert_eq!(store.job(failed.id).await.unwrap().state, JobState::Failed);
    let due = store.claim_deliveries(10, TTL).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].job, failed.id);
    // Cancelling an ended job opens no second delivery.
    store.cancel_job(cancelled.id).await.unwrap();
    assert_eq!(
        store.claim_deliveries(10, Duration::ZERO).await.unwrap(),
        []
    );
}

async fn an_expired_delivery_claim_is_claimed_again(store: &dyn Store) {
    let (job, _) = store
        .create_job(notifying_job(
            1,
            &["https://a.example/", "https://b.example/"],
        ))
        .await
        .unwrap();
    store.cancel_job(job.id).await.unwrap();
    // A coordinator claims it and dies: with a claim of zero length it is due again at once.
    let first = store.claim_deliveries(10, Duration::ZERO).await.unwrap();
    assert_eq!(first[0].attempt, 1);
    let second = store.claim_deliveries(10, TTL).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].attempt, 2);
    // The first claimant's late settle records its delivery but does not
    // reschedule what the second claim owns.
    store
        .settle_delivery(job.id, 1, &["https://a.example/".into()], None)
        .await
        .unwrap();
    assert_eq!(store.claim_deliveries(10, TTL).await.unwrap(), []);
    store
        .settle_delivery(job.id, 2, &[], Some(Duration::ZERO))
        .await
        .unwrap();
    let third = store.claim_deliveries(10, TTL).await.unwrap();
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].attempt, 3);
    assert_eq!(third[0].pending, ["https://b.example/"]);
    // At most `max` per claim.
    store
        .settle_delivery(job.id, 3, &[], Some(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(store.claim_deliveries(0, TTL).await.unwrap(), []);
}

/// Polls `f` until it returns Some, for at most 20 s (reaping needs real time on Redis).
async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..400 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached within 20 s");
}

/// Waits until the leases of `w` expire and the reaper takes them back.
async fn reap_all(store: &dyn Store) -> Vec<Reaped> {
    eventually(|| async {
        let r = store.reap(5).await.expect("reap");
        (!r.is_empty()).then_some(r)
    })
    .await
}

pub async fn create_job_queues_every_task(store: &dyn Store) {
    let job = new_job(3, "tiny");
    let id = job.id;
    let (record, created) = store.create_job(job).await.unwrap();
    assert!(created);
    assert_eq!(record.state, JobState::Running);
    assert_eq!(record.counts.total, 3);
    assert_eq!(record.counts.queued, 3);
    let tasks = store.tasks(id).await.unwrap();
    assert_eq!(
        tasks.iter().map(|t| t.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(tasks.iter().all(|t| t.state == TaskState::Queued));
    assert!(store.jobs(10).await.unwrap().iter().any(|j| j.id == id));
    assert!(matches!(
        store.job(JobId::new()).await,
        Err(StoreError::JobNotFound(_))
    ));
}

pub async fn a_jobs_trace_context_is_kept_with_it(store: &dyn Store) {
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut traced = new_job(2, "tiny");
    traced.traceparent = Some(traceparent.into());
    let (record, _) = store.create_job(traced).await.unwrap();
    assert_eq!(record.traceparent.as_deref(), Some(traceparent));
    let read = store.job(record.id).await.unwrap();
    assert_eq!(read.traceparent.as_deref(), Some(traceparent));
    let (plain, _) = store.create_job(new_job(1, "tiny")).await.unwrap();
    assert_eq!(store.job(plain.id).await.unwrap().traceparent, None);
    let listed = store.jobs(10).await.unwrap();
    let find = |id| {
        listed
            .iter()
            .find(|j| j.id == id)
            .map(|j| j.traceparent.clone())
    };
    assert_eq!(find(record.id), Some(Some(traceparent.to_string())));
    assert_eq!(find(plain.id), Some(None));
}

pub async fn a_jobs_submitter_is_kept_with_it(store: &dyn Store) {
    let mut named = new_job(1, "tiny");
    named.submitted_by = Some("alice".into());
    let (record, _) = store.create_job(named).await.unwrap();
    assert_eq!(record.submitted_by.as_deref(), Some("alice"));
    let (plain, _) = store.create_job(new_job(1, "tiny")).await.unwrap();
    assert_eq!(plain.submitted_by, None);
    let listed = store.jobs(10).await.unwrap();
    let by = |id| {
        listed
            .iter()
            .find(|j| j.id == id)
            .map(|j| j.submitted_by.clone())
    };
    assert_eq!(by(record.id), Some(Some("alice".to_string())));
    assert_eq!(by(plain.id), Some(None));
    // Ending the job keeps it.
    store.cancel_job(record.id).await.unwrap();
    let read = store.job(record.id).await.unwrap();
    assert_eq!(read.submitted_by.as_deref(), Some("alice"));
}

pub async fn idempotency_key_returns_the_same_job(store: &dyn Store) {
    let mut a = new_job(9, "tiny");
    a.idempotency_key = Some("batch-7".into());
    let mut b = new_job(9, "tiny");
    b.idempotency_key = Some("batch-7".into());
    let (ja, created_a) = store.create_job(a).await.unwrap();
    let (jb, created_b) = store.create_job(b).await.unwrap();
    assert!(created_a && !created_b);
    assert_eq!(ja.id, jb.id);
    assert_eq!(store.tasks(ja.id).await.unwrap().len(), 9);
    let mut other_project = new_job(1, "tiny");
    other_project.idempotency_key = Some("batch-7".into());
    other_project.project = "elsewhere".into();
    let (jc, created_c) = store.create_job(other_project).await.unwrap();
    assert!(created_c);
    assert_ne!(jc.id, ja.id);
}

pub async fn claim_leases_in_item_order_with_new_epochs(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(3, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let leases = claim(store, "w1", 2).await;
    assert_eq!(leases.iter().map(|l| l.index).collect::<Vec<_>>(), [0, 1]);
    assert!(leases.iter().all(|l| l.epoch == Epoch(1) && l.job == id));
    let record = store.job(id).await.unwrap();
    assert_eq!((record.counts.queued, record.counts.leased), (1, 2));
    let events = store.events(id, 0, 100).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.kind == EventKind::Leased));
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    let running = store.running(id).await.unwrap();
    assert_eq!(running.len(), 2);
    let task = store.task(leases[0].task).await.unwrap();
    assert_eq!(task.holder(), Some(&worker("w1")));
    assert_eq!(task.attempts.len(), 1);
}

pub async fn claim_only_gives_models_the_worker_holds(store: &dyn Store) {
    store
        .register_worker(registration("w-other", &["sdxl"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("w-tiny", &["tiny"]), None)
        .await
        .unwrap();
    let mut job = new_job(2, "tiny");
    job.tasks[1].recipe.model_hash = "some-other-hash".into();
    store.create_job(job).await.unwrap();
    assert!(claim(store, "w-other", 4).await.is_empty());
    let leases = claim(store, "w-tiny", 4).await;
    assert_eq!(
        leases.len(),
        1,
        "a task pinned to another model hash must not be leased"
    );
    assert_eq!(leases[0].index, 0);
}

pub async fn higher_priority_goes_first(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let low = new_job(2, "tiny");
    let mut high = new_job(2, "tiny");
    high.priority = 5;
    let high_id = high.id;
    store.create_job(low).await.unwrap();
    store.create_job(high).await.unwrap();
    let leases = claim(store, "w1", 2).await;
    assert!(leases.iter().all(|l| l.job == high_id));
}

pub async fn completing_every_task_finishes_the_job(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(2, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let leases = claim(store, "w1", 2).await;
    let first = store
        .complete(
            &worker("w1"),
            None,
            leases[0].task,
            leases[0].epoch,
            result(),
        )
        .await
        .unwrap();
    assert_eq!(first, CompleteOutcome::Accepted { job_finished: None });
    let last = store
        .complete(
            &worker("w1"),
            None,
            leases[1].task,
            leases[1].epoch,
            result(),
        )
        .await
        .unwrap();
    let CompleteOutcome::Accepted {
        job_finished: Some(job),
    } = last
    else {
        panic!("the last completion must finish the job: {last:?}");
    };
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.counts.completed, 2);
    let task = store.task(leases[0].task).await.unwrap();
    assert_eq!(task.state, TaskState::Completed);
    let mut expected = result();
    expected.class = "cpu-f32".into();
    assert_eq!(
        task.result,
        Some(expected),
        "the store records the worker's class"
    );
    assert_eq!(task.attempts[0].outcome, Outcome::Completed);
    let events = store.events(id, 0, 100).await.unwrap();
    assert_eq!(events.last().map(|e| e.kind), Some(EventKind::JobFinished));
    let w = store.workers().await.unwrap();
    assert_eq!(w[0].completed, 2);
}

pub async fn expired_lease_is_fenced(store: &dyn Store) {
    store
        .register_worker(registration("slow", &["tiny"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("fast", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(1, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let old = store
        .claim(
            &worker("slow"),
            None,
            1,
            Duration::from_millis(100),
            NO_WAIT,
            &[],
            &[],
            &NO_CAPS,
        )
        .await
        .unwrap()
        .leases;
    assert_eq!(old.len(), 1);
    let reaped = reap_all(store).await;
    assert_eq!(reaped.len(), 1);
    assert!(reaped[0].requeued);
    assert_eq!(reaped[0].worker, worker("slow"));
    let new = claim(store, "fast", 1).await;
    assert_eq!(new.len(), 1);
    assert!(new[0].epoch > old[0].epoch);

    let stale = store
        .complete(&worker("slow"), None, old[0].task, old[0].epoch, result())
        .await
        .unwrap();
    assert!(matches!(stale, CompleteOutcome::Stale { .. }), "{stale:?}");
    let hb = store
        .heartbeat(
            &worker("slow"),
            None,
            &[ProgressReport {
                task: old[0].task,
                epoch: old[0].epoch,
                step: 3,
            }],
            TTL,
        )
        .await
        .unwrap();
    assert_eq!(
        hb.abandon,
        vec![(old[0].task, old[0].epoch, AbandonReason::LeaseLost)]
    );
    let task = store.task(new[0].task).await.unwrap();
    assert_eq!(task.state, TaskState::Leased);
    assert_eq!(task.holder(), Some(&worker("fast")));
    assert_eq!(task.attempts.len(), 2);
    assert_eq!(task.attempts[0].outcome, Outcome::Expired);
    assert_eq!(task.attempts[0].fault, Some(Fault::WorkerLost));
    let ok = store
        .complete(&worker("fast"), None, new[0].task, new[0].epoch, result())
        .await
        .unwrap();
    assert!(matches!(ok, CompleteOutcome::Accepted { .. }));
    let kinds: Vec<_> = store
        .events(id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&EventKind::Expired));
    assert!(kinds.contains(&EventKind::StaleRefused));
}

pub async fn heartbeat_extends_the_current_lease_only(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(1, "tiny");
    store.create_job(job).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    let hb = store
        .heartbeat(
            &worker("w1"),
            None,
            &[
                ProgressReport {
                    task: lease.task,
                    epoch: lease.epoch,
                    step: 2,
                },
                ProgressReport {
                    task: lease.task,
                    epoch: Epoch(99),
                    step: 2,
                },
            ],
            TTL,
        )
        .await
        .unwrap();
    assert_eq!(hb.extended, vec![lease.task]);
    assert_eq!(
        hb.abandon,
        vec![(lease.task, Epoch(99), AbandonReason::LeaseLost)]
    );
    assert!(!hb.drain);
    assert_eq!(store.task(lease.task).await.unwrap().step, 2);
    assert!(matches!(
        store.heartbeat(&worker("nobody"), None, &[], TTL).await,
        Err(StoreError::UnknownWorker(_))
    ));
}

pub async fn failed_task_is_retried_on_another_worker(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("w2", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(1, "tiny");
    store.create_job(job).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    let out = store
        .fail(
            &worker("w1"),
            None,
            lease.task,
            lease.epoch,
            Fault::OutOfMemory,
            "CUDA out of memory",
            5,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        FailOutcome::Recorded {
            will_retry: true,
            job_finished: None
        }
    );
    assert!(
        claim(store, "w1", 1).await.is_empty(),
        "the worker that failed it must not get it back while w2 can take it"
    );
    let again = claim(store, "w2", 1).await;
    assert_eq!(again.len(), 1);
    let task = store.task(lease.task).await.unwrap();
    assert_eq!(task.attempts[0].fault, Some(Fault::OutOfMemory));
    assert_eq!(task.attempts[0].outcome, Outcome::Failed);
}

pub async fn failures_stop_at_the_attempt_limit(store: &dyn Store) {
    store
        .register_worker(registration("only", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(1, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    for attempt in 1..=2 {
        let leases = claim(store, "only", 1).await;
        assert_eq!(
            leases.len(),
            1,
            "attempt {attempt}: the only worker may retry"
        );
        let out = store
            .fail(
                &worker("only"),
                None,
                leases[0].task,
                leases[0].epoch,
                Fault::Internal,
                "boom",
                2,
            )
            .await
            .unwrap();
        if attempt == 2 {
            let FailOutcome::Recorded {
                will_retry: false,
                job_finished: Some(job),
            } = out
            else {
                panic!("second failure must end the task and the job: {out:?}");
            };
            assert_eq!(job.state, JobState::Failed);
        }
    }
    assert_eq!(store.job(id).await.unwrap().counts.failed, 1);
}

pub async fn bad_input_is_not_retried(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(1, "tiny");
    store.create_job(job).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    let out = store
        .fail(
            &worker("w1"),
            None,
            lease.task,
            lease.epoch,
            Fault::BadInput,
            "bad",
            5,
        )
        .await
        .unwrap();
    assert!(matches!(
        out,
        FailOutcome::Recorded {
            will_retry: false,
            job_finished: Some(_)
        }
    ));
}

pub async fn handed_back_task_does_not_count_against_the_limit(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(1, "tiny");
    store.create_job(job).await.unwrap();
    for _ in 0..3 {
        let lease = claim(store, "w1", 1).await.remove(0);
        let out = store
            .fail(
                &worker("w1"),
                None,
                lease.task,
                lease.epoch,
                Fault::Cancelled,
                "draining",
                1,
            )
            .await
            .unwrap();
        assert!(matches!(
            out,
            FailOutcome::Recorded {
                will_retry: true,
                ..
            }
        ));
    }
}

/// A draining worker's hand-back (a `Cancelled` fault) is fenced like any
/// report: under a stale epoch it changes nothing; under the current one the
/// task is queued at once for the next worker, its attempt ends `Cancelled`,
/// and the handed-back render's late result is refused as stale.
pub async fn a_hand_back_is_fenced_and_its_late_result_is_stale(store: &dyn Store) {
    for w in ["w1", "w2"] {
        store
            .register_worker(registration(w, &["tiny"]), None)
            .await
            .unwrap();
    }
    let job = new_job(1, "tiny");
    store.create_job(job).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    let stale = store
        .fail(
            &worker("w1"),
            None,
            lease.task,
            Epoch(lease.epoch.0 + 1),
            Fault::Cancelled,
            "draining",
            3,
        )
        .await
        .unwrap();
    assert!(matches!(stale, FailOutcome::Stale { .. }), "{stale:?}");
    assert!(
        claim(store, "w2", 1).await.is_empty(),
        "a stale hand-back leaves the lease with w1"
    );
    let out = store
        .fail(
            &worker("w1"),
            None,
            lease.task,
            lease.epoch,
            Fault::Cancelled,
            "draining",
            3,
        )
        .await
        .unwrap();
    assert!(matches!(
        out,
        FailOutcome::Recorded {
            will_retry: true,
            job_finished: None
        }
    ));
    let next = claim(store, "w2", 1).await.remove(0);
    assert_eq!(next.task, lease.task);
    assert!(next.epoch > lease.epoch);
    let late = store
        .complete(&worker("w1"), None, lease.task, lease.epoch, result())
        .await
        .unwrap();
    assert!(matches!(late, CompleteOutcome::Stale { .. }), "{late:?}");
    let task = store.task(lease.task).await.unwrap();
    let outcomes: Vec<_> = task
        .attempts
        .iter()
        .map(|a| (a.worker.as_str().to_string(), a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("w1".to_string(), Outcome::Cancelled),
            ("w2".to_string(), Outcome::Running)
        ]
    );
}

pub async fn cancel_stops_leasing_and_abandons_running_tasks(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(3, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    let cancelled = store.cancel_job(id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.counts.cancelled, 3);
    assert!(claim(store, "w1", 3).await.is_empty());
    let hb = store
        .heartbeat(
            &worker("w1"),
            None,
            &[ProgressReport {
                task: lease.task,
                epoch: lease.epoch,
                step: 1,
            }],
            TTL,
        )
        .await
        .unwrap();
    assert_eq!(
        hb.abandon,
        vec![(lease.task, lease.epoch, AbandonReason::Cancelled)]
    );
    let late = store
        .complete(&worker("w1"), None, lease.task, lease.epoch, result())
        .await
        .unwrap();
    assert!(matches!(late, CompleteOutcome::Stale { .. }));
    let finished: Vec<_> = store
        .events(id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::JobFinished)
        .collect();
    assert_eq!(finished.len(), 1, "exactly one JobFinished event");
    assert!(store.running(id).await.unwrap().is_empty());
}

pub async fn registering_again_releases_the_old_sessions_leases(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(2, "tiny");
    store.create_job(job).await.unwrap();
    let leases = claim(store, "w1", 2).await;
    let released = store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    assert_eq!(released.len(), 2);
    let again = claim(store, "w1", 2).await;
    assert_eq!(again.len(), 2);
    assert!(again[0].epoch > leases[0].epoch);
}

pub async fn draining_worker_gets_no_work(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    store.create_job(new_job(1, "tiny")).await.unwrap();
    let w = store.drain_worker(&worker("w1")).await.unwrap();
    assert!(w.draining);
    let c = store
        .claim(
            &worker("w1"),
            None,
            1,
            TTL,
            Duration::from_secs(10),
            &[],
            &[],
            &NO_CAPS,
        )
        .await
        .unwrap();
    assert!(c.drain && c.leases.is_empty());
    assert!(matches!(
        store
            .claim(&worker("ghost"), None, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
            .await,
        Err(StoreError::UnknownWorker(_))
    ));
}

pub async fn waiting_claim_wakes_when_work_arrives(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let w1 = worker("w1");
    let waiting = store.claim(
        &w1,
        None,
        1,
        TTL,
        Duration::from_secs(60),
        &[],
        &[],
        &NO_CAPS,
    );
    let submit = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.create_job(new_job(1, "tiny")).await.unwrap();
    };
    let (claim, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(waiting, submit)
    })
    .await
    .expect("the waiting claim must wake up well before its 60 s wait");
    assert_eq!(claim.unwrap().leases.len(), 1);
}

/// A long poll left open by a worker that then fell silent (stopped, cut
/// off) leases nothing when work arrives once the worker has been silent for
/// a lease TTL: its own leases have expired by then, and would go straight
/// back to it. A call of its own afterwards leases as usual.
pub async fn a_waiting_claim_leases_nothing_to_a_worker_silent_for_a_ttl(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let w1 = worker("w1");
    let ttl = Duration::from_millis(100);
    let waiting = store.claim(
        &w1,
        None,
        1,
        ttl,
        Duration::from_millis(1500),
        &[],
        &[],
        &NO_CAPS,
    );
    let submit = async {
        // Nothing is heard from w1 meanwhile: its waiting claim's retries
        // are no sign of life.
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.create_job(new_job(1, "tiny")).await.unwrap();
    };
    let (claim, ()) = tokio::join!(waiting, submit);
    assert!(
        claim.unwrap().leases.is_empty(),
        "the silent worker's long poll took the work"
    );
    let fresh = store
        .claim(&w1, None, 1, ttl, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap();
    assert_eq!(fresh.leases.len(), 1, "a call of its own is heard");
}

pub async fn events_resume_after_a_cursor(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(3, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    claim(store, "w1", 3).await;
    let all = store.events(id, 0, 100).await.unwrap();
    let tail = store.events(id, 1, 100).await.unwrap();
    assert_eq!(tail, all[1..].to_vec());
    assert_eq!(store.events(id, 0, 1).await.unwrap().len(), 1);
    store
        .wait_events(id, 0, Duration::from_secs(10))
        .await
        .unwrap();
}

pub async fn blobs_are_kept_once_per_job(store: &dyn Store) {
    let mut job = new_job(2, "tiny");
    let sha = "ab".repeat(32);
    job.blobs = vec![(sha.clone(), bytes::Bytes::from_static(b"image bytes"))];
    let id = job.id;
    store.create_job(job).await.unwrap();
    let got = store
        .blobs(id, &[sha.clone(), "cd".repeat(32)])
        .await
        .unwrap();
    assert_eq!(got, vec![(sha, bytes::Bytes::from_static(b"image bytes"))]);
}

pub async fn replayed_completion_is_accepted_again(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    store.create_job(new_job(1, "tiny")).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    for _ in 0..2 {
        let out = store
            .complete(&worker("w1"), None, lease.task, lease.epoch, result())
            .await
            .unwrap();
        assert!(
            matches!(out, CompleteOutcome::Accepted { .. }),
            "a retried completion (its first answer lost) is accepted: {out:?}"
        );
    }
    let other = store
        .complete(&worker("w2"), None, lease.task, lease.epoch, result())
        .await
        .unwrap();
    assert!(matches!(other, CompleteOutcome::Stale { .. }));
}

/// A completion's next claim, as a Complete with `lease_next` asks for it.
fn next_claim(max: usize) -> NextClaim<'static> {
    NextClaim {
        max,
        ttl: TTL,
        resident: &[],
        ready: &[],
        caps: &NO_CAPS,
    }
}

pub async fn a_completion_carries_the_next_claim(store: &dyn Store) {
    for w in ["w1", "w2"] {
        store
            .register_worker(registration(w, &["tiny"]), None)
            .await
            .unwrap();
    }
    let (job, _) = store.create_job(new_job(3, "tiny")).await.unwrap();
    let first = claim(store, "w1", 1).await.remove(0);
    let (out, next) = store
        .complete_and_claim(
            &worker("w1"),
            None,
            first.task,
            first.epoch,
            result(),
            next_claim(1),
        )
        .await
        .unwrap();
    assert_eq!(out, CompleteOutcome::Accepted { job_finished: None });
    let second = next.expect("accepted: claimed").unwrap().leases;
    assert_eq!(second.iter().map(|l| l.index).collect::<Vec<_>>(), [1]);
    assert_eq!(second[0].epoch, Epoch(1));
    // A stale completion claims nothing: w2 still gets the next task.
    let (out, next) = store
        .complete_and_claim(
            &worker("w2"),
            None,
            first.task,
            first.epoch,
            result(),
            next_claim(1),
        )
        .await
        .unwrap();
    assert!(matches!(out, CompleteOutcome::Stale { .. }), "{out:?}");
    assert!(next.is_none(), "a refused completion claims nothing");
    let third = claim(store, "w2", 1).await.remove(0);
    assert_eq!(third.index, 2);
    store
        .complete(&worker("w2"), None, third.task, third.epoch, result())
        .await
        .unwrap();
    // The last completion ends the job and finds nothing more to lease.
    let (out, next) = store
        .complete_and_claim(
            &worker("w1"),
            None,
            second[0].task,
            second[0].epoch,
            result(),
            next_claim(1),
        )
        .await
        .unwrap();
    let CompleteOutcome::Accepted {
        job_finished: Some(done),
    } = out
    else {
        panic!("the last completion ends the job: {out:?}");
    };
    assert_eq!((done.id, done.state), (job.id, JobState::Completed));
    assert_eq!(next.expect("accepted: claimed").unwrap(), Claim::default());
    let tasks = store.tasks(job.id).await.unwrap();
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed));
}

pub async fn concurrent_completions_each_get_their_own_answer(store: &dyn Store) {
    const WORKERS: usize = 12;
    let names: Vec<String> = (0..WORKERS).map(|i| format!("w{i}")).collect();
    for w in &names {
        store
            .register_worker(registration(w, &["tiny"]), None)
            .await
            .unwrap();
    }
    let (job, _) = store
        .create_job(new_job(2 * WORKERS as u32, "tiny"))
        .await
        .unwrap();
    let mut held = Vec::new();
    for w in &names {
        held.push((w.clone(), claim(store, w, 1).await.remove(0)));
    }
    // Every worker completes at once and asks for its next task: each
    // completion is accepted and each gets a task of its own.
    let rounds = futures::future::join_all(held.iter().map(|(w, l)| async move {
        let (out, next) = store
            .complete_and_claim(&worker(w), None, l.task, l.epoch, result(), next_claim(1))
            .await
            .unwrap();
        (
            w.clone(),
            out,
            next.expect("accepted: claimed").unwrap().leases,
        )
    }))
    .await;
    let mut seen: Vec<TaskId> = held.iter().map(|(_, l)| l.task).collect();
    let mut second = Vec::new();
    for (w, out, leases) in rounds {
        assert_eq!(out, CompleteOutcome::Accepted { job_finished: None });
        assert_eq!(leases.len(), 1, "{w} gets one task");
        seen.push(leases[0].task);
        second.push((w, leases[0].clone()));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 2 * WORKERS, "no task leased twice");
    // The second round ends the job, once.
    let ends = futures::future::join_all(second.iter().map(|(w, l)| async move {
        let (out, next) = store
            .complete_and_claim(&worker(w), None, l.task, l.epoch, result(), next_claim(1))
            .await
            .unwrap();
        assert!(next.expect("accepted: claimed").unwrap().leases.is_empty());
        out
    }))
    .await;
    let finished: Vec<_> = ends
        .iter()
        .filter(|o| {
            matches!(
                o,
                CompleteOutcome::Accepted {
                    job_finished: Some(_)
                }
            )
        })
        .collect();
    assert_eq!(finished.len(), 1, "the job ends once: {ends:?}");
    let record = store.job(job.id).await.unwrap();
    assert_eq!(record.state, JobState::Completed);
    // Calls that arrive together may be served together (the Redis store's
    // group commit, which writes their counters once): each is still
    // counted once, in the job, the workers, the day's usage and the log.
    let n = 2 * WORKERS as u32;
    assert_eq!(
        record.counts,
        TaskCounts {
            total: n,
            completed: n,
            ..TaskCounts::default()
        }
    );
    let workers = store.workers().await.unwrap();
    for w in &names {
        let record = workers
            .iter()
            .find(|r| r.registration.id.as_str() == w)
            .unwrap();
        assert_eq!((record.completed, record.failed), (2, 0), "{w}");
        assert!(record.running.is_empty(), "{w} holds nothing");
    }
    let usage = store.usage(0).await.unwrap();
    let images: u64 = usage.iter().map(|r| r.usage.images).sum();
    let render_ms: u64 = usage.iter().map(|r| r.usage.render_ms).sum();
    assert_eq!((images, render_ms), (u64::from(n), u64::from(n) * 5));
    // n leases, n completions and the job's end, numbered 1, 2, 3, ...
    let events = store.events(job.id, 0, 10 * n as usize).await.unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=u64::from(2 * n + 1)).collect::<Vec<_>>());
    let leases = events
        .iter()
        .filter(|e| e.kind == EventKind::Leased)
        .count();
    assert_eq!(leases, n as usize);
}

fn registration_of(id: &str, models: &[&str], class: &str) -> WorkerRegistration {
    let mut r = registration(id, models);
    r.determinism_class = class.into();
    r
}

/// A job with a series: an anchor (index 0) and `shots` shots that start from it.
fn series_job(shots: u32) -> NewJob {
    let mut job = new_job(shots + 1, "tiny");
    job.pin_class = true;
    for t in &mut job.tasks[1..] {
        t.series = Some(SeriesPlace {
            name: "mira".into(),
            shot: t.index,
            depends_on: Some(0),
        });
        t.recipe.strength = 0.4;
        t.recipe.noise_seed = Some(777);
    }
    job.tasks[0].series = Some(SeriesPlace {
        name: "mira".into(),
        shot: 0,
        depends_on: None,
    });
    job
}

pub async fn shots_wait_for_their_anchor(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = series_job(2);
    let id = job.id;
    store.create_job(job).await.unwrap();
    let first = claim(store, "w1", 3).await;
    assert_eq!(first.len(), 1, "only the anchor is claimable");
    assert_eq!(first[0].index, 0);
    assert_eq!(
        store.job(id).await.unwrap().counts.queued,
        2,
        "waiting shots count as queued"
    );
    assert!(claim(store, "w1", 3).await.is_empty());
    store
        .complete(&worker("w1"), None, first[0].task, first[0].epoch, result())
        .await
        .unwrap();
    let shots = claim(store, "w1", 3).await;
    assert_eq!(shots.iter().map(|l| l.index).collect::<Vec<_>>(), [1, 2]);
    let anchor_sha = result().sha256;
    assert!(
        shots
            .iter()
            .all(|l| l.recipe.init_image.as_deref() == Some(anchor_sha.as_str()))
    );
    let tasks = store.tasks(id).await.unwrap();
    assert_eq!(
        tasks[1].recipe.init_image.as_deref(),
        Some(anchor_sha.as_str())
    );
    assert_eq!(tasks[1].series.as_ref().unwrap().depends_on, Some(0));
    let anchor_done = tasks[0].attempts[0].ended_at_ms.unwrap();
    assert!(tasks[1].attempts[0].started_at_ms >= anchor_done);
}

pub async fn a_failed_anchor_fails_its_shots(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = series_job(2);
    let id = job.id;
    store.create_job(job).await.unwrap();
    let anchor = claim(store, "w1", 1).await.remove(0);
    let out = store
        .fail(
            &worker("w1"),
            None,
            anchor.task,
            anchor.epoch,
            Fault::BadInput,
            "bad",
            5,
        )
        .await
        .unwrap();
    let FailOutcome::Recorded {
        job_finished: Some(job),
        ..
    } = out
    else {
        panic!("the job must end with its anchor: {out:?}");
    };
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.counts.failed, 3);
    assert_eq!(store.job(id).await.unwrap().counts.queued, 0);
}

/// Found by the differential test: Redis kept the batch key a shot had
/// before its anchor's image became its init image, and filled a free slot
/// with it as if it were a text-to-image task.
pub async fn a_shot_is_not_batched_with_text_to_image_tasks(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let series = series_job(1);
    let shot = series.tasks[1].id;
    store.create_job(series).await.unwrap();
    let anchor = claim(store, "w1", 1).await.remove(0);
    store
        .complete(&worker("w1"), None, anchor.task, anchor.epoch, result())
        .await
        .unwrap();
    let mut wide = new_job(1, "tiny");
    wide.priority = 1;
    wide.tasks[0].recipe.seed = 200;
    wide.tasks[0].recipe.width = 128;
    let wide_task = wide.tasks[0].id;
    let mut first = new_job(1, "tiny");
    first.priority = 2;
    first.tasks[0].recipe.seed = 100;
    let first_task = first.tasks[0].id;
    store.create_job(wide).await.unwrap();
    store.create_job(first).await.unwrap();
    let leases = claim(store, "w1", 2).await;
    assert_eq!(
        leases.iter().map(|l| l.task).collect::<Vec<_>>(),
        [first_task, wide_task],
        "no task shares the first one's batch, so the second slot goes by priority; the shot {shot} starts from an image"
    );
}

/// Found by the differential test: when a claim served an anchor from an
/// earlier result, Redis did not see the shots that released, and leased
/// lower-priority work instead.
pub async fn shots_released_by_a_served_anchor_are_leased_in_the_same_claim(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    // An earlier render of the anchor's recipe.
    store.create_job(new_job(1, "tiny")).await.unwrap();
    let earlier = claim(store, "w1", 1).await.remove(0);
    store
        .complete(&worker("w1"), None, earlier.task, earlier.epoch, result())
        .await
        .unwrap();
    let mut series = series_job(1);
    series.priority = 1;
    let (anchor, shot) = (series.tasks[0].id, series.tasks[1].id);
    store.create_job(series).await.unwrap();
    let mut low = new_job(1, "tiny");
    low.tasks[0].recipe.seed = 500;
    store.create_job(low).await.unwrap();
    let c = store
        .claim(&worker("w1"), None, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap();
    assert_eq!(
        c.deduped.iter().map(|d| d.task).collect::<Vec<_>>(),
        [anchor]
    );
    assert_eq!(
        c.leases.iter().map(|l| l.task).collect::<Vec<_>>(),
        [shot],
        "the released shot outranks the lower-priority job"
    );
}

/// A shot's recipe includes its anchor's image: a shot of another anchor
/// image is not served from it (Redis kept the recipe hash of the shot
/// from before its init image was set).
pub async fn a_shot_is_served_only_from_a_render_of_the_same_init_image(store: &dyn Store) {
    for w in ["w1", "w2"] {
        store
            .register_worker(registration(w, &["tiny"]), None)
            .await
            .unwrap();
    }
    let a = series_job(1);
    let b = series_job(1);
    let b_shot = b.tasks[1].id;
    store.create_job(a).await.unwrap();
    store.create_job(b).await.unwrap();
    // Both anchors render before either is done: two images of one recipe.
    let a_anchor = claim(store, "w1", 1).await.remove(0);
    let b_anchor = claim(store, "w2", 1).await.remove(0);
    let mut other_image = result();
    other_image.sha256 = "11".repeat(32);
    store
        .complete(&worker("w1"), None, a_anchor.task, a_anchor.epoch, result())
        .await
        .unwrap();
    store
        .complete(
            &worker("w2"),
            None,
            b_anchor.task,
            b_anchor.epoch,
            other_image,
        )
        .await
        .unwrap();
    let a_shot = claim(store, "w1", 1).await.remove(0);
    store
        .complete(&worker("w1"), None, a_shot.task, a_shot.epoch, result())
        .await
        .unwrap();
    let c = store
        .claim(&worker("w2"), None, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap();
    assert!(
        c.deduped.is_empty(),
        "the shot of the other anchor image is not that render: {:?}",
        c.deduped
    );
    assert_eq!(
        c.leases.iter().map(|l| l.task).collect::<Vec<_>>(),
        [b_shot]
    );
}

/// Found by the differential test: with every unfinished task leased, the
/// Redis cancel script failed halfway (the job marked cancelled, its leases
/// not ended).
pub async fn cancelling_a_job_whose_tasks_are_all_leased(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(2, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let leases = claim(store, "w1", 2).await;
    assert_eq!(leases.len(), 2);
    let cancelled = store.cancel_job(id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(
        cancelled.counts,
        TaskCounts {
            total: 2,
            cancelled: 2,
            ..Default::default()
        }
    );
    assert!(store.running(id).await.unwrap().is_empty());
    assert!(store.workers().await.unwrap()[0].running.is_empty());
}

/// Found by the differential test: Redis ended the waiting shots of a
/// cancelled job a second time when it ended the anchor's lease.
pub async fn cancelling_a_job_with_a_leased_anchor_cancels_each_shot_once(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = series_job(2);
    let id = job.id;
    store.create_job(job).await.unwrap();
    let anchor = claim(store, "w1", 1).await.remove(0);
    let cancelled = store.cancel_job(id).await.unwrap();
    assert_eq!(
        cancelled.counts,
        TaskCounts {
            total: 3,
            cancelled: 3,
            ..Default::default()
        }
    );
    let tasks = store.tasks(id).await.unwrap();
    assert!(tasks.iter().all(|t| t.state == TaskState::Cancelled));
    let events = store.events(id, 0, 100).await.unwrap();
    let cancelled_events: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::Cancelled)
        .map(|e| e.task)
        .collect();
    assert_eq!(
        cancelled_events,
        vec![Some(anchor.task)],
        "only the lease ends with an event; the shots were never leased"
    );
    assert!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::Cancelled)
            .all(|e| e.fault == Some(Fault::Cancelled)),
        "a cancellation is no one's bad input: {events:?}"
    );
}

pub async fn a_series_stays_on_one_determinism_class(store: &dyn Store) {
    store
        .register_worker(registration_of("f32-a", &["tiny"], "cpu/f32"), None)
        .await
        .unwrap();
    store
        .register_worker(registration_of("f16", &["tiny"], "cpu/f16"), None)
        .await
        .unwrap();
    store
        .register_worker(registration_of("f32-b", &["tiny"], "cpu/f32"), None)
        .await
        .unwrap();
    let job = series_job(3);
    let id = job.id;
    store.create_job(job).await.unwrap();
    let anchor = claim(store, "f32-a", 1).await.remove(0);
    assert_eq!(
        store.job(id).await.unwrap().class.as_deref(),
        Some("cpu/f32")
    );
    store
        .complete(&worker("f32-a"), None, anchor.task, anchor.epoch, result())
        .await
        .unwrap();
    assert!(
        claim(store, "f16", 3).await.is_empty(),
        "another class gets none of the series"
    );
    assert_eq!(
        claim(store, "f32-b", 1).await.len(),
        1,
        "the same class gets the shots"
    );
}

pub async fn equal_priority_jobs_share_fairly(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let big = new_job(50, "tiny");
    let mut small = new_job(5, "tiny");
    // Other recipes than the big job's, or they would be served from its results.
    for t in &mut small.tasks {
        t.recipe.seed += 1000;
    }
    let (big_id, small_id) = (big.id, small.id);
    store.create_job(big).await.unwrap();
    store.create_job(small).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..10 {
        let l = claim(store, "w1", 1).await.remove(0);
        order.push(l.job);
        store
            .complete(&worker("w1"), None, l.task, l.epoch, result())
            .await
            .unwrap();
    }
    let small_served = order.iter().filter(|j| **j == small_id).count();
    assert_eq!(
        small_served, 5,
        "the small job interleaves from the start: {order:?}"
    );
    assert_eq!(order[0], big_id, "the older job goes first");
    assert_eq!(
        store.job(small_id).await.unwrap().state,
        JobState::Completed
    );
}

pub async fn workers_keep_to_their_resident_model(store: &dyn Store) {
    store
        .register_worker(registration("a", &["m1", "m2"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("b", &["m1", "m2"]), None)
        .await
        .unwrap();
    // The m2 job is older, but a has m1 resident and b has m2 resident.
    store.create_job(new_job(20, "m2")).await.unwrap();
    store.create_job(new_job(5, "m1")).await.unwrap();
    let b = store
        .claim(
            &worker("b"),
            None,
            1,
            TTL,
            NO_WAIT,
            &["m2".to_string()],
            &[],
            &NO_CAPS,
        )
        .await
        .unwrap();
    assert_eq!(b.leases[0].recipe.model, "m2");
    for _ in 0..5 {
        let a = store
            .claim(
                &worker("a"),
                None,
                1,
                TTL,
                NO_WAIT,
                &["m1".to_string()],
                &[],
                &NO_CAPS,
            )
            .await
            .unwrap();
        assert_eq!(a.leases.len(), 1);
        assert_eq!(
            a.leases[0].recipe.model, "m1",
            "a must not switch while m1 has work"
        );
        store
            .complete(
                &worker("a"),
                None,
                a.leases[0].task,
                a.leases[0].epoch,
                result(),
            )
            .await
            .unwrap();
    }
    let a = store
        .claim(
            &worker("a"),
            None,
            1,
            TTL,
            NO_WAIT,
            &["m1".to_string()],
            &[],
            &NO_CAPS,
        )
        .await
        .unwrap();
    assert_eq!(
        a.leases[0].recipe.model, "m2",
        "with m1 done and 18 m2 tasks for one holder, a switches"
    );
    // Leave b a backlog it clears soon enough alone: nobody else loads m2 for it.
    loop {
        let left: u32 = store
            .jobs(10)
            .await
            .unwrap()
            .iter()
            .map(|j| j.counts.queued)
            .sum();
        if left <= 4 {
            break;
        }
        let b = store
            .claim(
                &worker("b"),
                None,
                1,
                TTL,
                NO_WAIT,
                &["m2".to_string()],
                &[],
                &NO_CAPS,
            )
            .await
            .unwrap();
        assert_eq!(b.leases.len(), 1);
    }
    store
        .register_worker(registration("c", &["m1", "m2"]), None)
        .await
        .unwrap();
    let c = store
        .claim(
            &worker("c"),
            None,
            1,
            TTL,
            NO_WAIT,
            &["m1".to_string()],
            &[],
            &NO_CAPS,
        )
        .await
        .unwrap();
    assert!(
        c.leases.is_empty(),
        "4 m2 tasks and two holders do not justify loading m2: {:?}",
        c.leases
    );
}

/// Claims one task for `w` reporting `resident` loaded.
async fn claim_resident(store: &dyn Store, w: &str, resident: &str) -> Vec<Lease> {
    store
        .claim(
            &worker(w),
            None,
            1,
            TTL,
            NO_WAIT,
            &[resident.to_string()],
            &[],
            &NO_CAPS,
        )
        .await
        .expect("claim")
        .leases
}

pub async fn a_worker_switches_early_to_balance_the_drain_time(store: &dyn Store) {
    for w in ["a", "b", "c"] {
        store
            .register_worker(registration(w, &["m1", "m2"]), None)
            .await
            .unwrap();
    }
    store.create_job(new_job(17, "m1")).await.unwrap();
    let mut m2 = new_job(12, "m2");
    for t in &mut m2.tasks {
        t.recipe.seed += 1000;
    }
    store.create_job(m2).await.unwrap();
    let model = |l: &[Lease]| l.iter().map(|l| l.recipe.model.clone()).collect::<Vec<_>>();
    assert_eq!(model(&claim_resident(store, "a", "m1").await), ["m1"]);
    assert_eq!(model(&claim_resident(store, "b", "m2").await), ["m2"]);
    // m1: 16 tasks for its one holder; m2: 11 for b alone once c leaves.
    assert_eq!(
        model(&claim_resident(store, "c", "m2").await),
        ["m1"],
        "c leaves m2 while it has work: m1's backlog per holder is longer"
    );
    // d can render m1 but has only m3 loaded, which has no work (it
    // registers now: a worker that has reported nothing counts for its
    // whole catalog).
    store
        .register_worker(registration("d", &["m1", "m3"]), None)
        .await
        .unwrap();
    // Until c reports m1 loaded, it counts as m1's holder and not m2's.
    assert!(
        claim_resident(store, "d", "m3").await.is_empty(),
        "15 m1 tasks for a and c (loading) do not justify another load"
    );
    assert_eq!(
        model(&claim_resident(store, "c", "m2").await),
        ["m1"],
        "c keeps to the model it is loading, though it still reports m2"
    );
}

pub async fn a_worker_failing_a_job_is_quarantined(store: &dyn Store) {
    store
        .register_worker(registration("bad", &["tiny"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("good", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(6, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    for _ in 0..3 {
        let l = claim(store, "bad", 1).await.remove(0);
        store
            .fail(
                &worker("bad"),
                None,
                l.task,
                l.epoch,
                Fault::Internal,
                "broken GPU",
                5,
            )
            .await
            .unwrap();
    }
    assert!(
        claim(store, "bad", 1).await.is_empty(),
        "quarantined for this job"
    );
    let other = new_job(1, "tiny");
    store.create_job(other).await.unwrap();
    assert_eq!(
        claim(store, "bad", 1).await.len(),
        1,
        "other jobs still go to it"
    );
    while let Some(l) = claim(store, "good", 1).await.pop() {
        store
            .complete(&worker("good"), None, l.task, l.epoch, result())
            .await
            .unwrap();
    }
    assert_eq!(store.job(id).await.unwrap().state, JobState::Completed);
}

/// The only worker holding a job's model fails it until quarantined, while a
/// live worker without the model idles: the task must fail for good with the
/// worker's error and end the job, not wait for a stand-in that cannot come.
pub async fn a_quarantined_worker_without_a_stand_in_fails_the_task(store: &dyn Store) {
    store
        .register_worker(registration("q-candle", &["tiny"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("q-sim", &["simtoy"]), None)
        .await
        .unwrap();
    let job = new_job(1, "simtoy");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let mut last = None;
    for attempt in 1..=policy::QUARANTINE_AFTER {
        let leases = claim(store, "q-sim", 1).await;
        assert_eq!(
            leases.len(),
            1,
            "attempt {attempt}: q-sim is the only worker with simtoy"
        );
        assert!(claim(store, "q-candle", 1).await.is_empty());
        last = Some(
            store
                .fail(
                    &worker("q-sim"),
                    None,
                    leases[0].task,
                    leases[0].epoch,
                    Fault::Internal,
                    "simulated failure",
                    5,
                )
                .await
                .unwrap(),
        );
        if attempt < policy::QUARANTINE_AFTER {
            assert!(
                matches!(
                    last,
                    Some(FailOutcome::Recorded {
                        will_retry: true,
                        ..
                    })
                ),
                "attempt {attempt}: {last:?}"
            );
        }
    }
    let Some(FailOutcome::Recorded {
        will_retry: false,
        job_finished: Some(done),
    }) = last
    else {
        panic!("the quarantining failure must end the task and the job: {last:?}");
    };
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.counts.failed, 1);
    assert_eq!(store.job(id).await.unwrap().state, JobState::Failed);
    let task = &store.tasks(id).await.unwrap()[0];
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.attempts.len(), 3, "2 attempts of 5 were left unused");
    let message = &task.attempts[2].message;
    assert!(
        message.starts_with("simulated failure") && message.contains("quarantined"),
        "the task fails with the worker's last error: {message}"
    );
}

/// A quarantined worker is still kept away while a capable worker is live.
pub async fn a_quarantined_worker_waits_for_a_capable_stand_in(store: &dyn Store) {
    store
        .register_worker(registration("bad", &["simtoy"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("good", &["simtoy"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration("other-model", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(4, "simtoy");
    store.create_job(job).await.unwrap();
    for _ in 0..policy::QUARANTINE_AFTER {
        let l = claim(store, "bad", 1).await.remove(0);
        let out = store
            .fail(
                &worker("bad"),
                None,
                l.task,
                l.epoch,
                Fault::Internal,
                "x",
                5,
            )
            .await
            .unwrap();
        assert!(
            matches!(
                out,
                FailOutcome::Recorded {
                    will_retry: true,
                    ..
                }
            ),
            "good can take the task: {out:?}"
        );
    }
    assert!(claim(store, "bad", 1).await.is_empty(), "quarantined");
    assert_eq!(claim(store, "good", 1).await.len(), 1);
}

/// A task is found by its job and index without reading the job's other
/// tasks, and a shot's lease names its anchor.
pub async fn a_task_is_found_by_its_index(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = series_job(2);
    let id = job.id;
    let ids: Vec<TaskId> = job.tasks.iter().map(|t| t.id).collect();
    store.create_job(job).await.unwrap();
    for (index, task) in ids.iter().enumerate() {
        let found = store.task_at(id, index as u32).await.unwrap();
        assert_eq!((found.id, found.index), (*task, index as u32));
    }
    assert!(matches!(
        store.task_at(id, 3).await,
        Err(StoreError::NoTaskAt { index: 3, .. })
    ));
    assert!(matches!(
        store.task_at(JobId::new(), 0).await,
        Err(StoreError::JobNotFound(_))
    ));
    let anchor = claim(store, "w1", 1).await.remove(0);
    assert_eq!(anchor.anchor, None);
    store
        .complete(&worker("w1"), None, anchor.task, anchor.epoch, result())
        .await
        .unwrap();
    let shots = claim(store, "w1", 2).await;
    assert_eq!(shots.len(), 2);
    assert!(shots.iter().all(|l| l.anchor == Some(0)));
    let found = store.task_at(id, 0).await.unwrap();
    assert_eq!(found.result.map(|r| r.sha256), Some(result().sha256));
}

/// A shot is keyed as the img2img task it becomes: a free slot beside a
/// shot goes to the next shot, not to a txt2img task between them.
pub async fn released_shots_batch_together(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let mut job = series_job(3);
    // Item 2 is a plain txt2img task, otherwise like the shots.
    job.tasks[2].series = None;
    store.create_job(job).await.unwrap();
    let anchor = claim(store, "w1", 1).await.remove(0);
    store
        .complete(&worker("w1"), None, anchor.task, anchor.epoch, result())
        .await
        .unwrap();
    let first = claim(store, "w1", 2).await;
    assert_eq!(
        first.iter().map(|l| l.index).collect::<Vec<_>>(),
        [1, 3],
        "the second shot shares the first one's batch"
    );
}

pub async fn an_identical_recipe_is_served_from_its_earlier_result(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    store
        .register_worker(registration_of("other-class", &["tiny"], "cpu/f16"), None)
        .await
        .unwrap();
    let first = new_job(1, "tiny");
    store.create_job(first).await.unwrap();
    let l = claim(store, "w1", 1).await.remove(0);
    store
        .complete(&worker("w1"), None, l.task, l.epoch, result())
        .await
        .unwrap();
    let again = new_job(2, "tiny");
    let again_id = again.id;
    store.create_job(again).await.unwrap();
    let c = store
        .claim(
            &worker("other-class"),
            None,
            2,
            TTL,
            NO_WAIT,
            &[],
            &[],
            &NO_CAPS,
        )
        .await
        .unwrap();
    assert!(
        c.deduped.is_empty(),
        "results of another class are not reused"
    );
    for l in c.leases {
        store
            .fail(
                &worker("other-class"),
                None,
                l.task,
                l.epoch,
                Fault::Cancelled,
                "handing back",
                5,
            )
            .await
            .unwrap();
    }
    let c = store
        .claim(&worker("w1"), None, 2, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap();
    assert_eq!(
        c.deduped.len(),
        1,
        "item 0 has the same recipe as the first job's"
    );
    assert_eq!(c.deduped[0].job, again_id);
    assert!(
        c.deduped[0].source.ends_with("/00000-prompt.png"),
        "{}",
        c.deduped[0].source
    );
    assert_eq!(c.leases.len(), 1, "item 1 is new and is rendered");
    let tasks = store.tasks(again_id).await.unwrap();
    assert_eq!(tasks[0].state, TaskState::Completed);
    assert!(
        tasks[0]
            .attempts
            .iter()
            .all(|a| a.outcome != Outcome::Completed),
        "a served task is not rendered: {:?}",
        tasks[0].attempts
    );
}

/// A free slot is not spent rendering a recipe an earlier render already
/// made: the filling pass serves it from that result, as the first pick does,
/// and fills the slot with the next task.
pub async fn a_free_slot_is_not_spent_on_a_recipe_already_rendered(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let first = new_job(2, "tiny");
    store.create_job(first).await.unwrap();
    for l in claim(store, "w1", 2).await {
        store
            .complete(&worker("w1"), None, l.task, l.epoch, result())
            .await
            .unwrap();
    }
    // Items 1 and 2 repeat the first job's items 0 and 1; items 0 and 3 are new.
    let mut again = new_job(4, "tiny");
    again.tasks[0].recipe = recipe("tiny", 10);
    again.tasks[1].recipe = recipe("tiny", 0);
    again.tasks[2].recipe = recipe("tiny", 1);
    again.tasks[3].recipe = recipe("tiny", 13);
    let again_id = again.id;
    store.create_job(again).await.unwrap();
    let c = store
        .claim(&worker("w1"), None, 2, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap();
    assert_eq!(
        c.leases.iter().map(|l| l.index).collect::<Vec<_>>(),
        [0, 3],
        "the repeated recipes take no slot"
    );
    let mut served: Vec<String> = c.deduped.iter().map(|d| d.file_name.clone()).collect();
    served.sort();
    assert_eq!(served, ["00001-prompt.png", "00002-prompt.png"]);
    let states: Vec<TaskState> = store
        .tasks(again_id)
        .await
        .unwrap()
        .iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(
        states,
        [
            TaskState::Leased,
            TaskState::Completed,
            TaskState::Completed,
            TaskState::Leased
        ]
    );
}

pub async fn free_slots_fill_with_the_same_batch(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let mut job = new_job(4, "tiny");
    job.tasks[1].recipe.width = 128;
    store.create_job(job).await.unwrap();
    let leases = claim(store, "w1", 3).await;
    assert_eq!(
        leases.iter().map(|l| l.index).collect::<Vec<_>>(),
        [0, 2, 3]
    );
}

pub async fn a_verification_runs_on_its_class_only(store: &dyn Store) {
    store
        .register_worker(registration_of("x", &["tiny"], "cpu/f16"), None)
        .await
        .unwrap();
    store
        .register_worker(registration_of("y", &["tiny"], "cpu/f32"), None)
        .await
        .unwrap();
    let mut job = new_job(1, "tiny");
    job.class = Some("cpu/f32".into());
    job.pin_class = true;
    job.dedupe = false;
    job.tasks[0].avoid = vec![worker("y")];
    store.create_job(job).await.unwrap();
    assert!(claim(store, "x", 1).await.is_empty(), "wrong class");
    assert_eq!(
        claim(store, "y", 1).await.len(),
        1,
        "the avoided worker renders when it is the only one of the class"
    );
}

pub async fn announced_models_are_listed(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny", "sd15"]), None)
        .await
        .unwrap();
    let models = store.models().await.unwrap();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["sd15", "tiny"]);
    assert_eq!(models[1].chosen(), "hash-of-tiny");
    assert_eq!(models[1].hashes[0].workers, [worker("w1")]);
}

/// A worker announcing `model` under `hash`.
fn holding(id: &str, model: &str, hash: &str) -> WorkerRegistration {
    let mut r = registration(id, &[]);
    r.models = vec![ModelInfo {
        name: model.into(),
        hash: hash.into(),
    }];
    r
}

/// A job of `n` tasks of `model` pinned to `hash`, as admission makes it.
fn pinned_job(n: u32, model: &str, hash: &str) -> NewJob {
    let mut job = new_job(n, model);
    for t in &mut job.tasks {
        t.recipe.model_hash = hash.into();
    }
    job
}

pub async fn a_drained_worker_does_not_change_what_a_model_means(store: &dyn Store) {
    store
        .register_worker(holding("w1", "tiny", "hash-of-tiny"), None)
        .await
        .unwrap();
    // Another hash that sorts first: a tie between live workers goes to it.
    store
        .register_worker(holding("w2", "tiny", "another-hash"), None)
        .await
        .unwrap();
    let tied = store.models().await.unwrap();
    assert_eq!(
        tied[0].chosen(),
        "another-hash",
        "a tie: the hash that sorts first"
    );
    store.drain_worker(&worker("w2")).await.unwrap();
    let models = store.models().await.unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].chosen(), "hash-of-tiny");
    assert!(
        models[0].disagreeing().is_empty(),
        "a drained worker does not vote: {models:?}"
    );
    let live: Vec<WorkerId> = store
        .live_workers()
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.id)
        .collect();
    assert_eq!(live, [worker("w1")]);
    // Registering again (a new session) makes it live again, with its hash.
    store
        .register_worker(holding("w2", "tiny", "another-hash"), None)
        .await
        .unwrap();
    assert_eq!(store.models().await.unwrap()[0].hashes.len(), 2);
}

pub async fn the_majority_hash_wins_and_the_minority_gets_no_task(store: &dyn Store) {
    for w in ["w1", "w2"] {
        store
            .register_worker(holding(w, "tiny", "hash-of-tiny"), None)
            .await
            .unwrap();
    }
    // Sorts first, but only one live worker holds it.
    store
        .register_worker(holding("w3", "tiny", "aaaa-minority"), None)
        .await
        .unwrap();
    let models = store.models().await.unwrap();
    assert_eq!(models[0].chosen(), "hash-of-tiny");
    assert_eq!(models[0].hashes[0].workers, [worker("w1"), worker("w2")]);
    assert_eq!(models[0].disagreeing()[0].hash, "aaaa-minority");
    assert_eq!(models[0].disagreeing()[0].workers, [worker("w3")]);
    store
        .create_job(pinned_job(2, "tiny", models[0].chosen()))
        .await
        .unwrap();
    assert!(
        claim(store, "w3", 2).await.is_empty(),
        "the minority worker gets no task pinned to the majority hash"
    );
    assert_eq!(claim(store, "w1", 2).await.len(), 2);
}

pub async fn unheld_pinned_tasks_fail_with_the_message(store: &dyn Store) {
    store
        .register_worker(holding("w1", "tiny", "hash-of-tiny"), None)
        .await
        .unwrap();
    let (job, _) = store
        .create_job(pinned_job(3, "tiny", "hash-of-tiny"))
        .await
        .unwrap();
    // A job with a webhook: ended by the failure, it is delivered like any.
    let mut notifying = notifying_job(1, &["https://u.example/"]);
    notifying.tasks[0].recipe.model_hash = "hash-of-tiny".into();
    let (small, _) = store.create_job(notifying).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    assert_eq!(lease.job, job.id);
    let pins = store.pinned_tasks().await.unwrap();
    assert_eq!(
        pins,
        [PinnedTasks {
            model: "tiny".into(),
            hash: "hash-of-tiny".into(),
            queued: 3,
            running: 1,
        }]
    );
    let msg = "no live worker held model \"tiny\" at its pinned hash hash-of-tiny";
    let held = store
        .fail_unheld("tiny", "hash-of-tiny", msg)
        .await
        .unwrap();
    assert_eq!(held, Unheld::default(), "a live holder keeps the tasks");
    assert_eq!(store.job(job.id).await.unwrap().counts.queued, 2);

    store.drain_worker(&worker("w1")).await.unwrap();
    store
        .register_worker(holding("w2", "tiny", "another-hash"), None)
        .await
        .unwrap();
    let done = store
        .fail_unheld("tiny", "hash-of-tiny", msg)
        .await
        .unwrap();
    assert_eq!(done.failed, 3);
    let finished: Vec<JobId> = done.finished.iter().map(|j| j.id).collect();
    assert_eq!(finished, [small.id], "the job with nothing else left ends");
    assert_eq!(done.finished[0].state, JobState::Failed);
    let due = store.claim_deliveries(10, TTL).await.unwrap();
    assert_eq!(due.len(), 1, "the ended job's webhook is due");
    assert_eq!(due[0].job, small.id);
    let counts = store.job(job.id).await.unwrap().counts;
    assert_eq!(
        (counts.queued, counts.leased, counts.failed),
        (0, 1, 2),
        "the leased task runs on"
    );
    let failures: Vec<Event> = store
        .events(job.id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::Failed)
        .collect();
    assert_eq!(failures.len(), 2);
    for e in &failures {
        assert_eq!(e.fault, Some(Fault::ModelUnavailable));
        assert_eq!(e.message, msg);
        assert_eq!(e.worker, None);
    }
    let tasks = store.tasks(job.id).await.unwrap();
    let states: Vec<TaskState> = tasks.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [TaskState::Leased, TaskState::Failed, TaskState::Failed]
    );
    // Idempotent: another coordinator doing the same finds nothing to fail.
    let again = store
        .fail_unheld("tiny", "hash-of-tiny", msg)
        .await
        .unwrap();
    assert_eq!(again, Unheld::default());
    assert!(
        store
            .pinned_tasks()
            .await
            .unwrap()
            .iter()
            .all(|p| p.queued == 0)
    );
    // The leased task completes, and its job ends as failed.
    let outcome = store
        .complete(&worker("w1"), None, lease.task, lease.epoch, result())
        .await
        .unwrap();
    let CompleteOutcome::Accepted { job_finished } = outcome else {
        panic!("completion refused: {outcome:?}");
    };
    assert_eq!(job_finished.map(|j| j.state), Some(JobState::Failed));
}

pub async fn unheld_anchors_fail_their_shots(store: &dyn Store) {
    let mut job = series_job(2);
    for t in &mut job.tasks {
        t.recipe.model_hash = "hash-of-tiny".into();
    }
    let (job, _) = store.create_job(job).await.unwrap();
    let done = store
        .fail_unheld("tiny", "hash-of-tiny", "nobody holds it")
        .await
        .unwrap();
    assert_eq!(done.failed, 1, "only the anchor was queued");
    assert_eq!(done.finished.len(), 1);
    let counts = store.job(job.id).await.unwrap().counts;
    assert_eq!((counts.failed, counts.queued), (3, 0));
}

/// The farm counts: tasks of running jobs per model (waiting shots count as
/// queued), live workers taking work per model, jobs and workers by state.
pub async fn the_farm_is_counted_by_model_and_state(store: &dyn Store) {
    let empty = store.farm_counts().await.unwrap();
    assert!(empty.models.is_empty(), "{empty:?}");
    assert!(
        empty
            .jobs
            .values()
            .chain(empty.workers.values())
            .all(|n| *n == 0)
    );
    assert_eq!(empty.jobs.len(), JobState::ALL.len(), "every state appears");
    assert_eq!(empty.workers.len(), WorkerState::ALL.len());

    for (id, models) in [
        ("w1", &["tiny", "sd15"][..]),
        ("w2", &["tiny"]),
        ("w3", &["tiny"]),
    ] {
        store
            .register_worker(registration(id, models), None)
            .await
            .unwrap();
    }
    store.drain_worker(&worker("w3")).await.unwrap();
    let done = new_job(1, "tiny");
    store.create_job(done).await.unwrap();
    let lease = claim(store, "w2", 1).await.remove(0);
    store
        .complete(&worker("w2"), None, lease.task, lease.epoch, result())
        .await
        .unwrap();
    let mut plain = new_job(3, "tiny");
    plain.dedupe = false;
    store.create_job(plain).await.unwrap();
    store.create_job(new_job(2, "sd15")).await.unwrap();
    assert_eq!(claim(store, "w2", 2).await.len(), 2, "w2 holds tiny only");
    store.create_job(series_job(2)).await.unwrap();

    let counts = store.farm_counts().await.unwrap();
    let load = |m: &str| counts.models.get(m).copied().unwrap_or_default();
    assert_eq!(
        load("tiny"),
        ModelLoad {
            queued: 1 + 3,
            running: 2,
            workers: 2
        },
        "one plain task and the series' anchor and two waiting shots queued; the draining w3 does not count"
    );
    assert_eq!(
        load("sd15"),
        ModelLoad {
            queued: 2,
            running: 0,
            workers: 1
        }
    );
    assert_eq!(counts.models.len(), 2, "{counts:?}");
    assert_eq!((counts.queued(), counts.running()), (6, 2));
    assert_eq!(counts.jobs[&JobState::Running], 3);
    assert_eq!(counts.jobs[&JobState::Completed], 1);
    assert_eq!(counts.jobs[&JobState::Failed], 0);
    assert_eq!(counts.workers[&WorkerState::Idle], 1);
    assert_eq!(counts.workers[&WorkerState::Busy], 1);
    assert_eq!(counts.workers[&WorkerState::Draining], 1);
    assert_eq!(counts.workers[&WorkerState::Lost], 0);
    store.ping().await.expect("the store answers a ping");
}

/// The owners of the binding tests: two worker tokens' names.
const POOL_A: Option<&str> = Some("pool-a");
const POOL_B: Option<&str> = Some("pool-b");

fn is_bound<T: std::fmt::Debug>(r: StoreResult<T>) -> bool {
    matches!(r, Err(StoreError::WorkerBound(ref w)) if w.as_str() == "w1")
}

/// Register, Lease, Heartbeat, Complete and Fail under a live worker's id by
/// another token (or none) are refused and change nothing; its own token
/// goes on.
pub async fn a_worker_id_is_bound_to_the_token_that_registered_it(store: &dyn Store) {
    let w1 = worker("w1");
    store
        .register_worker(registration("w1", &["tiny"]), POOL_A)
        .await
        .unwrap();
    let job = new_job(2, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let lease = store
        .claim(&w1, POOL_A, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap()
        .leases
        .remove(0);
    let tasks_before = store.tasks(id).await.unwrap();
    let events_before = store.events(id, 0, 1000).await.unwrap().len();

    let registered = store
        .register_worker(registration("w1", &["tiny"]), POOL_B)
        .await;
    assert!(
        is_bound(registered),
        "another token cannot take a live id over"
    );
    for owner in [POOL_B, None] {
        let claimed = store
            .claim(&w1, owner, 2, TTL, NO_WAIT, &[], &[], &NO_CAPS)
            .await;
        assert!(is_bound(claimed), "lease under another token");
        let progress = [ProgressReport {
            task: lease.task,
            epoch: lease.epoch,
            step: 3,
        }];
        let beat = store.heartbeat(&w1, owner, &progress, TTL).await;
        assert!(is_bound(beat), "heartbeat under another token");
        let completed = store
            .complete(&w1, owner, lease.task, lease.epoch, result())
            .await;
        assert!(is_bound(completed), "complete under another token");
        let failed = store
            .fail(
                &w1,
                owner,
                lease.task,
                lease.epoch,
                Fault::Internal,
                "forged",
                5,
            )
            .await;
        assert!(is_bound(failed), "fail under another token");
    }
    assert_eq!(
        store.tasks(id).await.unwrap(),
        tasks_before,
        "nothing changed"
    );
    assert_eq!(
        store.events(id, 0, 1000).await.unwrap().len(),
        events_before,
        "no event either"
    );

    let done = store
        .complete(&w1, POOL_A, lease.task, lease.epoch, result())
        .await
        .unwrap();
    assert_eq!(done, CompleteOutcome::Accepted { job_finished: None });
    let released = store
        .register_worker(registration("w1", &["tiny"]), POOL_A)
        .await
        .unwrap();
    assert!(released.is_empty(), "the same token may register again");
    let next = store
        .claim(&w1, POOL_A, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap();
    assert_eq!(next.leases.len(), 1);
}

/// Once the worker is dead (silent past the liveness window), another token
/// may register its id: the old session's leases are released, and the old
/// token is the one refused from then on.
pub async fn a_dead_workers_id_is_free_for_another_token(fixture: &dyn Fixture) {
    let store = fixture.store();
    let w1 = worker("w1");
    store
        .register_worker(registration("w1", &["tiny"]), POOL_A)
        .await
        .unwrap();
    store.create_job(new_job(1, "tiny")).await.unwrap();
    let lease = store
        .claim(&w1, POOL_A, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap()
        .leases
        .remove(0);
    assert!(is_bound(
        store
            .register_worker(registration("w1", &["tiny"]), POOL_B)
            .await
    ));
    fixture.let_workers_die().await;
    let released = store
        .register_worker(registration("w1", &["tiny"]), POOL_B)
        .await
        .expect("a dead worker's id is free");
    assert_eq!(
        released.iter().map(|r| r.task).collect::<Vec<_>>(),
        [lease.task]
    );
    let again = store
        .claim(&w1, POOL_B, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
        .await
        .unwrap();
    assert_eq!(again.leases.len(), 1);
    assert!(again.leases[0].epoch > lease.epoch);
    assert!(is_bound(
        store
            .claim(&w1, POOL_A, 1, TTL, NO_WAIT, &[], &[], &NO_CAPS)
            .await
    ));
    assert!(is_bound(
        store
            .complete(&w1, POOL_A, lease.task, lease.epoch, result())
            .await
    ));
}

fn project_job(project: &str, n: u32) -> NewJob {
    let mut job = new_job(n, "tiny");
    job.project = project.into();
    // Equal recipes across the two jobs must not be served from each other.
    job.dedupe = false;
    job
}

fn caps(project: &str, cap: u64) -> RunningCaps {
    RunningCaps::from([(project.to_string(), cap)])
}

async fn claim_capped(store: &dyn Store, w: &str, max: usize, caps: &RunningCaps) -> Vec<Lease> {
    store
        .claim(&worker(w), None, max, TTL, NO_WAIT, &[], &[], caps)
        .await
        .expect("claim")
        .leases
}

/// A project at its cap gets no new lease while another project's tasks are
/// still leased (no head-of-line blocking); a completion makes room for one.
pub async fn a_capped_project_never_has_more_than_its_cap_leased(store: &dyn Store) {
    for w in ["w1", "w2"] {
        store
            .register_worker(registration(w, &["tiny"]), None)
            .await
            .unwrap();
    }
    let capped = project_job("capped", 4);
    let free = project_job("free", 4);
    let (capped_id, free_id) = (capped.id, free.id);
    store.create_job(capped).await.unwrap();
    store.create_job(free).await.unwrap();
    let caps = caps("capped", 2);
    let of = |leases: &[Lease], job: JobId| leases.iter().filter(|l| l.job == job).count();

    let first = claim_capped(store, "w1", 4, &caps).await;
    assert_eq!(of(&first, capped_id), 2, "{first:?}");
    assert_eq!(of(&first, free_id), 2, "free slots go to the other project");
    let second = claim_capped(store, "w2", 4, &caps).await;
    assert_eq!(
        of(&second, capped_id),
        0,
        "the capped project is at its cap"
    );
    assert_eq!(of(&second, free_id), 2, "the other project is still served");
    assert!(claim_capped(store, "w2", 1, &caps).await.is_empty());
    assert_eq!(store.running(capped_id).await.unwrap().len(), 2);

    let done = first.iter().find(|l| l.job == capped_id).unwrap();
    store
        .complete(&worker("w1"), None, done.task, done.epoch, result())
        .await
        .unwrap();
    let next = claim_capped(store, "w2", 4, &caps).await;
    assert_eq!(of(&next, capped_id), 1, "one lease ended, one more starts");
    assert_eq!(next.len(), 1);
    assert!(claim_capped(store, "w2", 4, &caps).await.is_empty());
    assert_eq!(store.running(capped_id).await.unwrap().len(), 2);
    // Without the cap (the auth file reloaded without it) the rest is leased.
    let uncapped = claim_capped(store, "w2", 4, &NO_CAPS).await;
    assert_eq!(of(&uncapped, capped_id), 1);
}

/// Every way a lease ends gives the capped project its room back: a
/// completion, a failure, an expiry, the worker registering again and a
/// cancelled job. A stale report changes nothing.
pub async fn a_capped_project_gets_room_back_whenever_a_lease_ends(store: &dyn Store) {
    for w in ["w1", "w2"] {
        store
            .register_worker(registration(w, &["tiny"]), None)
            .await
            .unwrap();
    }
    let caps = caps("capped", 1);
    let job = project_job("capped", 5);
    let id = job.id;
    store.create_job(job).await.unwrap();
    let running = || async { store.running(id).await.unwrap().len() };

    // Completed.
    let l = claim_capped(store, "w1", 2, &caps).await;
    assert_eq!(l.len(), 1);
    assert!(claim_capped(store, "w2", 1, &caps).await.is_empty());
    store
        .complete(&worker("w1"), None, l[0].task, l[0].epoch, result())
        .await
        .unwrap();
    // Failed (retried).
    let l = claim_capped(store, "w1", 2, &caps).await;
    assert_eq!(l.len(), 1);
    store
        .fail(
            &worker("w1"),
            None,
            l[0].task,
            l[0].epoch,
            Fault::Internal,
            "x",
            5,
        )
        .await
        .unwrap();
    // Expired and reaped; the old holder's late completion is stale.
    let expiring = store
        .claim(
            &worker("w1"),
            None,
            1,
            Duration::from_millis(100),
            NO_WAIT,
            &[],
            &[],
            &caps,
        )
        .await
        .unwrap()
        .leases;
    assert_eq!(expiring.len(), 1);
    assert!(claim_capped(store, "w2", 1, &caps).await.is_empty());
    reap_all(store).await;
    let l = claim_capped(store, "w2", 1, &caps).await;
    assert_eq!(l.len(), 1, "the expired lease made room");
    let stale = store
        .complete(
            &worker("w1"),
            None,
            expiring[0].task,
            expiring[0].epoch,
            result(),
        )
        .await
        .unwrap();
    assert!(matches!(stale, CompleteOutcome::Stale { .. }));
    assert!(
        claim_capped(store, "w1", 1, &caps).await.is_empty(),
        "a stale report frees nothing"
    );
    // The holder registers again: its old session's lease is released.
    store
        .register_worker(registration("w2", &["tiny"]), None)
        .await
        .unwrap();
    let l = claim_capped(store, "w1", 1, &caps).await;
    assert_eq!(l.len(), 1, "the released lease made room");
    assert_eq!(running().await, 1);
    // Cancelled: another job of the project gets the room.
    let later = project_job("capped", 1);
    let later_id = later.id;
    store.create_job(later).await.unwrap();
    assert!(claim_capped(store, "w2", 1, &caps).await.is_empty());
    store.cancel_job(id).await.unwrap();
    let l = claim_capped(store, "w2", 1, &caps).await;
    assert_eq!(
        l.iter().map(|l| l.job).collect::<Vec<_>>(),
        [later_id],
        "the cancelled job's lease made room"
    );
}

/// A claim waiting for work while the project is at its cap is woken when
/// the project's lease ends, well before its wait is over.
pub async fn a_capped_project_wakes_a_waiting_claim_when_a_lease_ends(store: &dyn Store) {
    for w in ["w1", "w2"] {
        store
            .register_worker(registration(w, &["tiny"]), None)
            .await
            .unwrap();
    }
    let caps = caps("capped", 1);
    store.create_job(project_job("capped", 2)).await.unwrap();
    let held = claim_capped(store, "w1", 1, &caps).await.remove(0);
    assert!(claim_capped(store, "w2", 1, &caps).await.is_empty());
    let w2 = worker("w2");
    let waiting = store.claim(&w2, None, 1, TTL, Duration::from_secs(60), &[], &[], &caps);
    let complete = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        store
            .complete(&worker("w1"), None, held.task, held.epoch, result())
            .await
            .unwrap();
    };
    let (claim, ()) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(waiting, complete)
    })
    .await
    .expect("the waiting claim must wake up well before its 60 s wait");
    assert_eq!(claim.unwrap().leases.len(), 1);
}

/// A fresh store for one test, and whatever it needs kept alive (a server).
#[async_trait::async_trait]
pub(crate) trait Fixture: Send + Sync {
    /// Returns the store under test.
    fn store(&self) -> &dyn Store;

    /// Makes every registered worker silent for longer than the liveness
    /// window ([`policy::LIVE_MS`]), as if they had all died.
    async fn let_workers_die(&self);
}

/// Fails a leased task for good with an internal fault (one attempt allowed).
async fn fail_for_good(store: &dyn Store, w: &str, lease: &Lease) {
    let out = store
        .fail(
            &worker(w),
            None,
            lease.task,
            lease.epoch,
            Fault::Internal,
            "boom",
            1,
        )
        .await
        .unwrap();
    assert!(matches!(
        out,
        FailOutcome::Recorded {
            will_retry: false,
            ..
        }
    ));
}

pub async fn retry_requeues_failed_tasks_with_fresh_attempts(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(2, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    assert_eq!(
        store.retry_job(id).await.unwrap().1,
        0,
        "nothing failed yet"
    );
    let leases = claim(store, "w1", 2).await;
    fail_for_good(store, "w1", &leases[0]).await;
    store
        .complete(
            &worker("w1"),
            None,
            leases[1].task,
            leases[1].epoch,
            result(),
        )
        .await
        .unwrap();
    let failed = store.job(id).await.unwrap();
    assert_eq!(failed.state, JobState::Failed);

    let (record, requeued) = store.retry_job(id).await.unwrap();
    assert_eq!(requeued, 1);
    assert_eq!(record.state, JobState::Running);
    assert_eq!(record.finished_at_ms, None);
    assert_eq!(
        (
            record.counts.queued,
            record.counts.failed,
            record.counts.completed
        ),
        (1, 0, 1)
    );
    let task = store.task(leases[0].task).await.unwrap();
    assert_eq!(task.state, TaskState::Queued);
    assert_eq!(task.attempts.len(), 1, "the fault history is kept");
    assert_eq!(task.attempts[0].fault, Some(Fault::Internal));
    assert_eq!((task.counted_from, task.faults()), (1, 0), "fresh attempts");
    let events = store.events(id, 0, 100).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.kind, last.task, last.index),
        (EventKind::Retried, Some(leases[0].task), 0)
    );

    // The earlier fault no longer counts: with two attempts allowed, one
    // more failure is retried again.
    let again = claim(store, "w1", 2).await;
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].task, again[0].epoch), (leases[0].task, Epoch(2)));
    let out = store
        .fail(
            &worker("w1"),
            None,
            again[0].task,
            again[0].epoch,
            Fault::Internal,
            "boom",
            2,
        )
        .await
        .unwrap();
    assert!(matches!(
        out,
        FailOutcome::Recorded {
            will_retry: true,
            ..
        }
    ));
    let last = claim(store, "w1", 2).await;
    store
        .complete(&worker("w1"), None, last[0].task, last[0].epoch, result())
        .await
        .unwrap();
    let done = store.job(id).await.unwrap();
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.counts.completed, 2);
    assert_eq!(store.task(leases[0].task).await.unwrap().attempts.len(), 3);
    assert!(matches!(
        store.retry_job(JobId::new()).await,
        Err(StoreError::JobNotFound(_))
    ));
}

pub async fn retry_puts_the_shots_of_a_failed_anchor_back_behind_it(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let mut job = new_job(2, "tiny");
    job.pin_class = true;
    for t in &mut job.tasks {
        t.series = Some(SeriesPlace {
            name: "coast".into(),
            shot: t.index,
            depends_on: (t.index > 0).then_some(0),
        });
    }
    let id = job.id;
    store.create_job(job).await.unwrap();
    let anchor = claim(store, "w1", 2).await;
    assert_eq!(anchor.len(), 1);
    fail_for_good(store, "w1", &anchor[0]).await;
    assert_eq!(store.job(id).await.unwrap().counts.failed, 2);
    let (_, requeued) = store.retry_job(id).await.unwrap();
    assert_eq!(requeued, 2);
    let leases = claim(store, "w1", 2).await;
    assert_eq!(
        leases.iter().map(|l| l.index).collect::<Vec<_>>(),
        [0],
        "the shot waits for its anchor"
    );
    store
        .complete(
            &worker("w1"),
            None,
            leases[0].task,
            leases[0].epoch,
            result(),
        )
        .await
        .unwrap();
    let shot = claim(store, "w1", 2).await;
    assert_eq!(shot.iter().map(|l| l.index).collect::<Vec<_>>(), [1]);
    assert_eq!(
        shot[0].recipe.init_image.as_deref(),
        Some(result().sha256.as_str())
    );
}

pub async fn a_cancelled_job_is_not_retried(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(2, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let leases = claim(store, "w1", 1).await;
    fail_for_good(store, "w1", &leases[0]).await;
    store.cancel_job(id).await.unwrap();
    let (record, requeued) = store.retry_job(id).await.unwrap();
    assert_eq!((record.state, requeued), (JobState::Cancelled, 0));
}

pub async fn a_paused_job_keeps_its_place_and_gets_no_leases(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let a = new_job(3, "tiny");
    let b = new_job(3, "tiny");
    let (ida, idb) = (a.id, b.id);
    store.create_job(a).await.unwrap();
    store.create_job(b).await.unwrap();
    let running = claim(store, "w1", 1).await;
    assert_eq!(running[0].job, ida);
    let paused = store.pause_job(ida, true).await.unwrap();
    assert!(paused.paused);
    assert!(store.job(ida).await.unwrap().paused);
    // Nothing new of the paused job: both claims go to the other one.
    for _ in 0..2 {
        let l = claim(store, "w1", 1).await;
        assert_eq!(l[0].job, idb, "a paused job is not leased");
    }
    // Its running task finishes.
    store
        .complete(
            &worker("w1"),
            None,
            running[0].task,
            running[0].epoch,
            result(),
        )
        .await
        .unwrap();
    let resumed = store.pause_job(ida, false).await.unwrap();
    assert!(!resumed.paused);
    // Resumed, it is next again: the other job was served since.
    let l = claim(store, "w1", 1).await;
    assert_eq!((l[0].job, l[0].index), (ida, 1));
    let kinds: Vec<EventKind> = store
        .events(ida, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .filter(|k| matches!(k, EventKind::Paused | EventKind::Resumed))
        .collect();
    assert_eq!(kinds, [EventKind::Paused, EventKind::Resumed]);
    // Pausing twice changes nothing; a missing job is not found.
    store.pause_job(idb, true).await.unwrap();
    let before = store.events(idb, 0, 100).await.unwrap().len();
    store.pause_job(idb, true).await.unwrap();
    assert_eq!(store.events(idb, 0, 100).await.unwrap().len(), before);
    assert!(claim(store, "w1", 4).await.iter().all(|l| l.job == ida));
    assert!(matches!(
        store.pause_job(JobId::new(), true).await,
        Err(StoreError::JobNotFound(_))
    ));
}

pub async fn a_priority_change_reorders_queued_jobs(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let a = new_job(2, "tiny");
    let b = new_job(2, "tiny");
    let (ida, idb) = (a.id, b.id);
    store.create_job(a).await.unwrap();
    store.create_job(b).await.unwrap();
    let record = store.set_priority(idb, 5).await.unwrap();
    assert_eq!(record.priority, 5);
    assert_eq!(store.job(idb).await.unwrap().priority, 5);
    let first = claim(store, "w1", 2).await;
    assert!(
        first.iter().all(|l| l.job == idb),
        "the raised job goes first"
    );
    let last = store.events(idb, 0, 100).await.unwrap();
    assert!(
        last.iter()
            .any(|e| e.kind == EventKind::Reprioritized && e.message == "priority 5")
    );
    store.set_priority(ida, -1).await.unwrap();
    let c = new_job(1, "tiny");
    let idc = c.id;
    store.create_job(c).await.unwrap();
    assert_eq!(
        claim(store, "w1", 1).await[0].job,
        idc,
        "a lowered job goes after"
    );
    assert!(matches!(
        store.set_priority(JobId::new(), 1).await,
        Err(StoreError::JobNotFound(_))
    ));
}

pub async fn usage_counts_images_render_time_and_failed_attempts(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny", "sdxl"]), None)
        .await
        .unwrap();
    let today = usage_day(crate::clock::unix_ms());
    let a = new_job(2, "tiny");
    let mut b = new_job(1, "sdxl");
    b.project = "show-b".into();
    store.create_job(a).await.unwrap();
    store.create_job(b).await.unwrap();
    // The first claim takes the two tiny tasks (one model per claim): fail
    // them once (retried), then complete everything.
    let first = claim(store, "w1", 3).await;
    assert_eq!(first.len(), 2);
    for l in first {
        store
            .fail(
                &worker("w1"),
                None,
                l.task,
                l.epoch,
                Fault::Internal,
                "boom",
                3,
            )
            .await
            .unwrap();
    }
    for _ in 0..3 {
        for l in claim(store, "w1", 3).await {
            store
                .complete(&worker("w1"), None, l.task, l.epoch, result())
                .await
                .unwrap();
        }
    }
    let rows = store.usage(today - 1).await.unwrap();
    let got: Vec<(&str, &str, u64, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.project.as_str(),
                r.model.as_str(),
                r.usage.images,
                r.usage.render_ms,
                r.usage.failed_attempts,
            )
        })
        .collect();
    let render = result().render_ms;
    assert_eq!(
        got,
        [
            ("default", "tiny", 2, 2 * render, 2),
            ("show-b", "sdxl", 1, render, 0)
        ]
    );
    assert!(rows.iter().all(|r| r.day == today));
    assert!(
        store.usage(today + 1).await.unwrap().is_empty(),
        "no bucket of tomorrow"
    );
}

fn preview(step: u32) -> Preview {
    Preview {
        step,
        // Any bytes: the store keeps what the coordinator checked.
        png: vec![0x89, b'P', b'N', b'G', step as u8, 0xff],
    }
}

pub async fn a_preview_lives_only_while_its_lease_holds(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    let job = new_job(2, "tiny");
    let id = job.id;
    store.create_job(job).await.unwrap();
    let mut leases = claim(store, "w1", 2).await;
    if leases.len() < 2 {
        leases.extend(claim(store, "w1", 2).await);
    }
    leases.sort_by_key(|l| l.index);
    let (a, b) = (&leases[0], &leases[1]);
    let w1 = worker("w1");
    // Another epoch or another worker keeps nothing.
    let stale = store
        .put_preview(&w1, a.task, Epoch(99), &preview(1), TTL)
        .await
        .unwrap();
    assert!(!stale);
    let other = store
        .put_preview(&worker("w2"), a.task, a.epoch, &preview(1), TTL)
        .await
        .unwrap();
    assert!(!other);
    assert_eq!(store.preview(a.task).await.unwrap(), None);
    assert_eq!(store.previews(id).await.unwrap(), []);
    // The holder's previews are kept, the latest replacing the one before.
    for step in [1, 2] {
        let kept = store
            .put_preview(&w1, a.task, a.epoch, &preview(step), TTL)
            .await
            .unwrap();
        assert!(kept);
    }
    let kept = store
        .put_preview(&w1, b.task, b.epoch, &preview(3), TTL)
        .await
        .unwrap();
    assert!(kept);
    assert_eq!(store.preview(a.task).await.unwrap(), Some(preview(2)));
    let listed: Vec<(u32, Preview)> = store
        .previews(id)
        .await
        .unwrap()
        .into_iter()
        .map(|(r, p)| (r.index, p))
        .collect();
    assert_eq!(listed, [(0, preview(2)), (1, preview(3))]);
    // A completion ends the lease and its preview; a cancel ends the other.
    let done = store.complete(&w1, None, a.task, a.epoch, result()).await;
    assert!(matches!(done.unwrap(), CompleteOutcome::Accepted { .. }));
    assert_eq!(store.preview(a.task).await.unwrap(), None);
    let late = store
        .put_preview(&w1, a.task, a.epoch, &preview(4), TTL)
        .await
        .unwrap();
    assert!(!late);
    store.cancel_job(id).await.unwrap();
    assert_eq!(store.preview(b.task).await.unwrap(), None);
    assert_eq!(store.previews(id).await.unwrap(), []);
    assert!(matches!(
        store.previews(JobId::new()).await,
        Err(StoreError::JobNotFound(_))
    ));
}

pub async fn a_preview_runs_out_after_its_ttl(store: &dyn Store) {
    store
        .register_worker(registration("w1", &["tiny"]), None)
        .await
        .unwrap();
    store.create_job(new_job(1, "tiny")).await.unwrap();
    let lease = claim(store, "w1", 1).await.remove(0);
    let short = Duration::from_millis(50);
    let kept = store
        .put_preview(&worker("w1"), lease.task, lease.epoch, &preview(1), short)
        .await
        .unwrap();
    assert!(kept);
    // The lease (30 s) still holds; the preview goes on its own.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.preview(lease.task).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the preview outlived its TTL by 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.task(lease.task).await.unwrap().state,
        TaskState::Leased
    );
}

/// Instantiates the whole suite for one backend: `$make` is an async
/// expression giving a fresh [`Fixture`]; it is dropped when the test ends.
macro_rules! store_conformance {
    ($make:expr) => {
        store_conformance!(@tests $make;
            create_job_queues_every_task,
            tasks_go_only_to_workers_holding_their_assets,
            a_worker_prefers_tasks_whose_lora_set_it_holds_ready,
            free_slots_take_tasks_with_ready_lora_sets_next,
            a_jobs_trace_context_is_kept_with_it,
            a_jobs_submitter_is_kept_with_it,
            idempotency_key_returns_the_same_job,
            claim_leases_in_item_order_with_new_epochs,
            claim_only_gives_models_the_worker_holds,
            higher_priority_goes_first,
            completing_every_task_finishes_the_job,
            expired_lease_is_fenced,
            heartbeat_extends_the_current_lease_only,
            failed_task_is_retried_on_another_worker,
            failures_stop_at_the_attempt_limit,
            bad_input_is_not_retried,
            handed_back_task_does_not_count_against_the_limit,
            a_hand_back_is_fenced_and_its_late_result_is_stale,
            cancel_stops_leasing_and_abandons_running_tasks,
            registering_again_releases_the_old_sessions_leases,
            draining_worker_gets_no_work,
            waiting_claim_wakes_when_work_arrives,
            a_waiting_claim_leases_nothing_to_a_worker_silent_for_a_ttl,
            events_resume_after_a_cursor,
            blobs_are_kept_once_per_job,
            replayed_completion_is_accepted_again,
            a_completion_carries_the_next_claim,
            concurrent_completions_each_get_their_own_answer,
            shots_wait_for_their_anchor,
            a_failed_anchor_fails_its_shots,
            cancelling_a_job_with_a_leased_anchor_cancels_each_shot_once,
            cancelling_a_job_whose_tasks_are_all_leased,
            a_shot_is_not_batched_with_text_to_image_tasks,
            shots_released_by_a_served_anchor_are_leased_in_the_same_claim,
            a_shot_is_served_only_from_a_render_of_the_same_init_image,
            a_series_stays_on_one_determinism_class,
            equal_priority_jobs_share_fairly,
            workers_keep_to_their_resident_model,
            a_worker_switches_early_to_balance_the_drain_time,
            a_worker_failing_a_job_is_quarantined,
            a_quarantined_worker_without_a_stand_in_fails_the_task,
            a_quarantined_worker_waits_for_a_capable_stand_in,
            a_task_is_found_by_its_index,
            released_shots_batch_together,
            an_identical_recipe_is_served_from_its_earlier_result,
            a_free_slot_is_not_spent_on_a_recipe_already_rendered,
            free_slots_fill_with_the_same_batch,
            a_verification_runs_on_its_class_only,
            announced_models_are_listed,
            the_farm_is_counted_by_model_and_state,
            a_drained_worker_does_not_change_what_a_model_means,
            the_majority_hash_wins_and_the_minority_gets_no_task,
            unheld_pinned_tasks_fail_with_the_message,
            unheld_anchors_fail_their_shots,
            a_delivery_opens_when_a_notifying_job_ends,
            a_cancelled_or_failed_job_delivers_too,
            an_expired_delivery_claim_is_claimed_again,
            a_worker_id_is_bound_to_the_token_that_registered_it,
            a_capped_project_never_has_more_than_its_cap_leased,
            a_capped_project_gets_room_back_whenever_a_lease_ends,
            a_capped_project_wakes_a_waiting_claim_when_a_lease_ends,
            retry_requeues_failed_tasks_with_fresh_attempts,
            retry_puts_the_shots_of_a_failed_anchor_back_behind_it,
            a_cancelled_job_is_not_retried,
            a_paused_job_keeps_its_place_and_gets_no_leases,
            a_priority_change_reorders_queued_jobs,
            usage_counts_images_render_time_and_failed_attempts,
            a_preview_lives_only_while_its_lease_holds,
            a_preview_runs_out_after_its_ttl
        );
        store_conformance!(@fixture_tests $make;
            a_dead_workers_id_is_free_for_another_token
        );
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                use $crate::store::conformance::Fixture as _;
                let fixture = $make.await;
                $crate::store::conformance::$name(fixture.store()).await;
            }
        )*
    };
    (@fixture_tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let fixture = $make.await;
                $crate::store::conformance::$name(&fixture).await;
            }
        )*
    };
}
pub(crate) use store_conformance;

mod memory_store {
    struct Memory(crate::store::MemoryStore);

    #[async_trait::async_trait]
    impl super::Fixture for Memory {
        fn store(&self) -> &dyn crate::store::Store {
            &self.0
        }

        async fn let_workers_die(&self) {
            let window = std::time::Duration::from_millis(crate::store::policy::LIVE_MS);
            self.0.advance_clock(window);
        }
    }

    async fn fresh() -> Memory {
        Memory(crate::store::MemoryStore::new())
    }
    super::store_conformance!(fresh());
}

mod redis_store {
    use std::time::Duration;

    /// The store first, so it disconnects before its server stops.
    struct Redis {
        store: crate::store::RedisStore,
        name: String,
        _server: kiln_tests::redis::RedisServer,
    }

    #[async_trait::async_trait]
    impl super::Fixture for Redis {
        fn store(&self) -> &dyn crate::store::Store {
            &self.store
        }

        /// Sets every worker's last call (`seen`, Redis ms) to the epoch:
        /// Redis' clock cannot be moved.
        async fn let_workers_die(&self) {
            let client = redis::Client::open(self._server.url()).expect("redis url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to the test redis");
            let prefix = format!("{{{}}}", self.name);
            let workers: Vec<String> = redis::cmd("SMEMBERS")
                .arg(format!("{prefix}:workers"))
                .query_async(&mut conn)
                .await
                .expect("SMEMBERS");
            for w in workers {
                let () = redis::cmd("HSET")
                    .arg(format!("{prefix}:worker:{w}"))
                    .arg("seen")
                    .arg(0)
                    .query_async(&mut conn)
                    .await
                    .expect("HSET");
            }
        }
    }

    async fn fresh() -> Redis {
        let server = kiln_tests::redis::RedisServer::start().expect("redis-server");
        let name = format!("test-{}", uuid::Uuid::new_v4().simple());
        let store = crate::store::RedisStore::connect(&crate::store::RedisConfig {
            url: server.url(),
            name: name.clone(),
            retention: Duration::from_secs(3600),
        })
        .await
        .expect("connect to the test redis");
        Redis {
            store,
            name,
            _server: server,
        }
    }
    super::store_conformance!(fresh());
}
