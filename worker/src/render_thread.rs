//! The render thread: one dedicated OS thread that runs renders one after
//! another, so denoising never blocks the async runtime and heartbeats keep
//! flowing while the device is busy.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;

use tokio::sync::oneshot;

use crate::render::{RenderError, RenderTask, Rendered, Renderer};

/// Shared between a task's agent side and its render: progress out, cancel in.
#[derive(Clone, Debug, Default)]
pub struct RenderControl {
    /// Denoising steps done.
    pub step: Arc<AtomicU32>,
    /// Set to stop the render at its next step.
    pub cancel: Arc<AtomicBool>,
}

impl RenderControl {
    /// Asks the render to stop at its next step.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Returns true once cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Returns the steps done so far.
    pub fn step(&self) -> u32 {
        self.step.load(Ordering::Relaxed)
    }
}

struct Job {
    task: RenderTask,
    control: RenderControl,
    reply: oneshot::Sender<Result<Rendered, RenderError>>,
}

/// Handle to the render thread; cloning shares the thread.
#[derive(Clone)]
pub struct RenderThread {
    jobs: mpsc::Sender<Job>,
}

impl RenderThread {
    /// Starts the thread over `renderer`. It ends when every handle is dropped.
    ///
    /// # Errors
    /// When the OS cannot start a thread.
    pub fn spawn(renderer: Arc<dyn Renderer>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("kiln-render".into())
            .spawn(move || {
                for job in rx {
                    let Job {
                        task,
                        control,
                        reply,
                    } = job;
                    if control.is_cancelled() {
                        let _ = reply.send(Err(RenderError::Cancelled));
                        continue;
                    }
                    let mut on_step = |done: u32| {
                        control.step.store(done, Ordering::Relaxed);
                        !control.is_cancelled()
                    };
                    // A panic inside a model (candle asserts) fails this task, not the worker.
                    let result =
                        catch_unwind(AssertUnwindSafe(|| renderer.render(&task, &mut on_step)))
                            .unwrap_or_else(|panic| {
                                let what = panic
                                    .downcast_ref::<String>()
                                    .map(String::as_str)
                                    .or_else(|| panic.downcast_ref::<&str>().copied())
                                    .unwrap_or("unknown panic");
                                Err(RenderError::Internal(format!(
                                    "the renderer panicked: {what}"
                                )))
                            });
                    let _ = reply.send(result);
                }
            })?;
        Ok(Self { jobs: tx })
    }

    /// Queues a render and waits for its result.
    pub async fn render(
        &self,
        task: RenderTask,
        control: RenderControl,
    ) -> Result<Rendered, RenderError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                task,
                control,
                reply,
            })
            .map_err(|_| RenderError::Internal("the render thread has stopped".into()))?;
        rx.await
            .map_err(|_| RenderError::Internal("the render thread dropped the task".into()))?
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
        }
    }

    #[tokio::test]
    async fn renders_report_progress_and_stop_when_cancelled() {
        let sim = SimRenderer::new(&["tiny".into()], Duration::from_millis(20));
        let thread = RenderThread::spawn(Arc::new(sim)).unwrap();
        let control = RenderControl::default();
        let pending = tokio::spawn({
            let (thread, control) = (thread.clone(), control.clone());
            async move { thread.render(RenderTask::txt2img(recipe()), control).await }
        });
        while control.step() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        control.cancel();
        let result = pending.await.unwrap();
        assert!(matches!(result, Err(RenderError::Cancelled)));
        assert!(control.step() < 50);
        let mut quick = recipe();
        quick.steps = 1;
        let done = thread
            .render(RenderTask::txt2img(quick), RenderControl::default())
            .await
            .unwrap();
        assert!(!done.png.is_empty());
    }
}
