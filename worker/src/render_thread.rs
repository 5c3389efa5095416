//! The render thread: one dedicated OS thread that runs renders one batch
//! after another, so denoising never blocks the async runtime and heartbeats
//! keep flowing while the device is busy. Tasks queued at the same time with
//! the same [`BatchKey`] run as one [`Renderer::render_batch`] call. Live
//! previews, when the thread makes them, wait in each task's
//! [`RenderControl`] for the agent's next heartbeat: only the latest is kept.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use kiln_domain::preview::Preview;
use kiln_domain::recipe::BatchKey;

use crate::metrics::{self, RenderOutcome};
use crate::render::{PreviewSink, RenderError, RenderTask, Rendered, Renderer};

/// Shared between a task's agent side and its render: progress out, cancel in.
#[derive(Clone, Debug, Default)]
pub struct RenderControl {
    /// Denoising steps done.
    pub step: Arc<AtomicU32>,
    /// Set to stop the render at its next step.
    pub cancel: Arc<AtomicBool>,
    /// The latest preview not yet sent; a newer one replaces it.
    pub preview: Arc<Mutex<Option<Preview>>>,
    /// Set when the render thread takes the task up to render it.
    pub started: Arc<AtomicBool>,
}

impl RenderControl {
    /// Asks the render to stop at its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Returns true once the render thread has taken the task up.
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    /// Returns true once cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Returns the steps done so far.
    pub fn step(&self) -> u32 {
        self.step.load(Ordering::Relaxed)
    }

    /// Keeps `preview` as the latest, replacing one not yet taken.
    pub fn set_preview(&self, preview: Preview) {
        // Nothing panics under this lock; a poisoned one still holds a valid preview.
        *self.preview.lock().unwrap_or_else(|p| p.into_inner()) = Some(preview);
    }

    /// Takes the latest preview not yet taken, if any.
    pub fn take_preview(&self) -> Option<Preview> {
        self.preview
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// A task waiting for the render thread, with the way back to its caller.
struct Job {
    task: RenderTask,
    control: RenderControl,
    reply: oneshot::Sender<Result<Rendered, RenderError>>,
}

/// Handle to the render thread; cloning shares the thread.
#[derive(Clone)]
pub struct RenderThread {
    /// Each message is the tasks of one submission (one lease answer, say).
    jobs: mpsc::Sender<Vec<Job>>,
}

impl RenderThread {
    /// Starts the thread over `renderer`, making a live preview every
    /// `preview_every` steps (0: none) and rendering at most `max_batch` tasks
    /// at once. It ends when every handle is dropped.
    ///
    /// The thread takes everything queued when it becomes free, groups the tasks by
    /// [`RenderTask::batch_key`] (groups in order of their first task, each cut into
    /// runs of at most `max_batch` in order) and hands each group to
    /// [`Renderer::render_batch`]: tasks leased together with the same model,
    /// size and schedule render as one batch. A group's tasks keep their own progress
    /// and cancellation.
    ///
    /// # Errors
    /// When the OS cannot start a thread.
    pub fn spawn(
        renderer: Arc<dyn Renderer>,
        preview_every: u32,
        max_batch: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<Job>>();
        std::thread::Builder::new()
            .name("kiln-render".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut queued = first;
                    while let Ok(more) = rx.try_recv() {
                        queued.extend(more);
                    }
                    for group in group_jobs(queued, max_batch) {
                        run_group(renderer.as_ref(), group, preview_every);
                    }
                }
            })?;
        Ok(Self { jobs: tx })
    }

    /// Queues tasks together, so that compatible ones render as one batch, and
    /// returns a receiver for each task's result, in order.
    pub fn submit(
        &self,
        tasks: Vec<(RenderTask, RenderControl)>,
    ) -> Vec<oneshot::Receiver<Result<Rendered, RenderError>>> {
        let mut jobs = Vec::with_capacity(tasks.len());
        let mut receivers = Vec::with_capacity(tasks.len());
        for (task, control) in tasks {
            let (reply, rx) = oneshot::channel();
            jobs.push(Job {
                task,
                control,
                reply,
            });
            receivers.push(rx);
        }
        if jobs.is_empty() {
            return receivers;
        }
        if let Err(mpsc::SendError(jobs)) = self.jobs.send(jobs) {
            for job in jobs {
                let _ = job.reply.send(Err(RenderError::Internal(
                    "the render thread has stopped".into(),
                )));
            }
        }
        receivers
    }

    /// Queues one render and waits for its result.
    pub async fn render(
        &self,
        task: RenderTask,
        control: RenderControl,
    ) -> Result<Rendered, RenderError> {
        let receiver = self.submit(vec![(task, control)]).pop();
        wait(receiver).await
    }
}

/// Waits for a result from the render thread.
pub async fn wait(
    receiver: Option<oneshot::Receiver<Result<Rendered, RenderError>>>,
) -> Result<Rendered, RenderError> {
    match receiver {
        Some(rx) => rx
            .await
            .map_err(|_| RenderError::Internal("the render thread dropped the task".into()))?,
        None => Err(RenderError::Internal("nothing was submitted".into())),
    }
}

/// Answers the cancelled jobs and groups the rest by batch key, in order of
/// first appearance, in groups of at most `max_batch` (at least one).
fn group_jobs(jobs: Vec<Job>, max_batch: usize) -> Vec<Vec<Job>> {
    let max_batch = max_batch.max(1);
    let mut groups: Vec<(BatchKey, Vec<Job>)> = Vec::new();
    for job in jobs {
        if job.control.is_cancelled() {
            metrics::render_skipped();
            let _ = job.reply.send(Err(RenderError::Cancelled));
            continue;
        }
        let key = job.task.batch_key();
        match groups
            .iter_mut()
            .find(|(k, members)| *k == key && members.len() < max_batch)
        {
            Some((_, members)) => members.push(job),
            None => groups.push((key, vec![job])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// Renders one group and answers each job.
fn run_group(renderer: &dyn Renderer, group: Vec<Job>, preview_every: u32) {
    let (tasks, rest): (Vec<RenderTask>, Vec<_>) = group
        .into_iter()
        .map(|j| (j.task, (j.control, j.reply)))
        .unzip();
    let controls: Vec<&RenderControl> = rest.iter().map(|(c, _)| c).collect();
    for control in &controls {
        control.started.store(true, Ordering::SeqCst);
    }
    if tasks.len() > 1 {
        tracing::debug!(tasks = tasks.len(), "rendering a batch");
    }
    // The group's tasks share one model (it is part of the batch key).
    let model = tasks
        .first()
        .map(|t| t.recipe.model.clone())
        .unwrap_or_default();
    let started = Instant::now();
    // Steps of a batch run together: the first task's steps time them all.
    // The first step's time would include the prompts' encoding, so steps
    // are timed from one to the next.
    let mut last_step: Option<Instant> = None;
    let mut on_step = |i: usize, done: u32| match controls.get(i) {
        Some(control) => {
            if i == 0 {
                let now = Instant::now();
                if let Some(previous) = last_step {
                    metrics::step(&model, now - previous);
                }
                last_step = Some(now);
            }
            control.step.store(done, Ordering::Relaxed);
            !control.is_cancelled()
        }
        None => false,
    };
    // A task rendered alone renders inside its own span; a batch inside one
    // `render_batch` span that follows from each task's.
    let span = match tasks.as_slice() {
        [task] => task.span.clone(),
        _ => {
            let span = tracing::info_span!("render_batch", tasks = tasks.len());
            for task in &tasks {
                span.follows_from(&task.span);
            }
            span
        }
    };
    let _entered = span.enter();
    let mut keep = |i: usize, preview: Preview| {
        if let Some(control) = controls.get(i) {
            control.set_preview(preview);
        }
    };
    let mut previews = PreviewSink {
        every: preview_every,
        send: &mut keep,
    };
    // A panic inside a model (candle asserts) fails these tasks, not the worker.
    let results = catch_unwind(AssertUnwindSafe(|| {
        renderer.render_batch_with_previews(&tasks, &mut on_step, &mut previews)
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        tasks
            .iter()
            .map(|_| {
                Err(RenderError::Internal(format!(
                    "the renderer panicked: {what}"
                )))
            })
            .collect()
    });
    let took = started.elapsed();
    let mut results = results.into_iter();
    for (_, reply) in rest {
        let result = results.next().unwrap_or_else(|| {
            Err(RenderError::Internal(
                "the renderer returned fewer results than tasks".into(),
            ))
        });
        let outcome = match &result {
            Ok(_) => RenderOutcome::Ok,
            Err(RenderError::Cancelled) => RenderOutcome::Cancelled,
            Err(_) => RenderOutcome::Failed,
        };
        metrics::render(&model, took, outcome);
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::SimRenderer;
    use kiln_proto::recipe::{Recipe, Scheduler};
    use std::time::Duration;

    fn recipe() -> Recipe {
        Recipe {
            model: "tiny".into(),
            model_hash: String::new(),
            prompt: "x".into(),
            negative_prompt: String::new(),
            seed: 1,
            steps: 50,
            guidance: 1.0,
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

    #[tokio::test]
    async fn renders_report_progress_and_stop_when_cancelled() {
        let sim = SimRenderer::new(&["tiny".into()], Duration::from_millis(20));
        let thread = RenderThread::spawn(Arc::new(sim), 10, 1).unwrap();
        let control = RenderControl::default();
        let pending = tokio::spawn({
            let (thread, control) = (thread.clone(), control.clone());
            async move { thread.render(RenderTask::txt2img(recipe()), control).await }
        });
        while control.step() < 11 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        control.cancel();
        let result = pending.await.unwrap();
        assert!(matches!(result, Err(RenderError::Cancelled)));
        // A preview every 10 steps: the latest waits for the heartbeat, once.
        let preview = control.take_preview().expect("a preview after 10 steps");
        assert!(preview.step >= 10 && preview.step % 10 == 0);
        assert!(control.take_preview().is_none());
        assert!(control.step() < 50);
        let mut quick = recipe();
        quick.steps = 1;
        let done = thread
            .render(RenderTask::txt2img(quick), RenderControl::default())
            .await
            .unwrap();
        assert!(!done.png.is_empty());
    }

    /// Records the size of every batch it is given and renders with the sim renderer.
    struct Recording {
        sim: SimRenderer,
        batches: std::sync::Mutex<Vec<Vec<u64>>>,
    }

    impl Renderer for Recording {
        fn models(&self) -> Vec<crate::render::ModelInfo> {
            self.sim.models()
        }

        fn determinism_class(&self) -> String {
            self.sim.determinism_class()
        }

        fn render(
            &self,
            task: &RenderTask,
            on_step: &mut dyn FnMut(u32) -> bool,
        ) -> Result<Rendered, RenderError> {
            self.sim.render(task, on_step)
        }

        fn render_batch(
            &self,
            tasks: &[RenderTask],
            on_step: &mut dyn FnMut(usize, u32) -> bool,
        ) -> Vec<Result<Rendered, RenderError>> {
            let seeds = tasks.iter().map(|t| t.recipe.seed).collect();
            self.batches.lock().unwrap().push(seeds);
            tasks
                .iter()
                .enumerate()
                .map(|(i, task)| self.sim.render(task, &mut |done| on_step(i, done)))
                .collect()
        }
    }

    fn task(seed: u64, steps: u32) -> (RenderTask, RenderControl) {
        let mut r = recipe();
        r.seed = seed;
        r.steps = steps;
        (RenderTask::txt2img(r), RenderControl::default())
    }

    /// Submits `tasks` at once to a thread that renders at most `max_batch`
    /// together; returns the seeds of each batch it rendered, in order, and
    /// each task's result.
    async fn batches_of(
        tasks: Vec<(RenderTask, RenderControl)>,
        max_batch: usize,
    ) -> (Vec<Vec<u64>>, Vec<Result<Rendered, RenderError>>) {
        let recording = Arc::new(Recording {
            sim: SimRenderer::new(&["tiny".into()], Duration::from_millis(1)),
            batches: Default::default(),
        });
        let thread = RenderThread::spawn(recording.clone(), 0, max_batch).unwrap();
        let mut results = Vec::new();
        for rx in thread.submit(tasks) {
            results.push(wait(Some(rx)).await);
        }
        let batches = recording.batches.lock().unwrap().clone();
        (batches, results)
    }

    #[tokio::test]
    async fn batches_never_exceed_the_limit() {
        let tasks = vec![task(1, 2), task(2, 2), task(3, 3), task(4, 2), task(5, 2)];
        let (batches, results) = batches_of(tasks, 2).await;
        assert_eq!(batches, [vec![1, 2], vec![3], vec![4, 5]]);
        assert!(results.iter().all(Result::is_ok));
        let tasks = vec![task(1, 2), task(2, 2), task(3, 2)];
        assert_eq!(batches_of(tasks, 1).await.0, [vec![1], vec![2], vec![3]]);
    }

    #[tokio::test]
    async fn tasks_submitted_together_batch_by_key() {
        // Seeds 1, 2 and 4 share a key; 3 has other steps; 5 is cancelled before it starts.
        let cancelled = task(5, 2);
        cancelled.1.cancel();
        let tasks = vec![task(1, 2), task(2, 2), task(3, 3), task(4, 2), cancelled];
        let (batches, results) = batches_of(tasks, 8).await;
        assert!(results[..4].iter().all(Result::is_ok));
        assert!(matches!(results[4], Err(RenderError::Cancelled)));
        assert_eq!(batches, [vec![1, 2, 4], vec![3]]);
    }
}
