//! Why a coordinator request failed, and the one place where that becomes a
//! gRPC status: the service handlers (`farm.rs`, `worker_link.rs`) return
//! `?` on a [`CoordinatorError`] and `From<CoordinatorError> for Status` picks
//! the code. Everything below the handlers speaks this type, never `Status`.

use std::fmt;

use kiln_proto::error::FieldError;
use kiln_proto::ids::{Epoch, JobId, TaskId, WorkerId};

use kiln_proto::status::bounded;
use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::contact_sheet::ContactSheetError;
use crate::results::ResultsError;
use crate::store::{StoreError, TaskRecord, TaskState};

/// Why a coordinator request failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field was refused.
    #[error(transparent)]
    InvalidField(#[from] FieldError),
    /// The store failed, or has no such job, task or worker.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The result store failed.
    #[error(transparent)]
    ResultStore(#[from] ResultsError),
    /// A worker reported on a lease that is not its own (any more).
    #[error("job {job}: worker {worker} cannot {report} task {task}: {refusal}")]
    Stale {
        /// The task's job.
        job: JobId,
        /// The task reported on.
        task: TaskId,
        /// The reporting worker.
        worker: WorkerId,
        /// What it reported.
        report: Report,
        /// Why the store refused it.
        refusal: StaleRefusal,
    },
    /// A verification was asked for a job that has not finished.
    #[error("job {0} is still running: verify it once it has finished")]
    StillRunning(JobId),
    /// A verification was asked for a job without a finished image.
    #[error("job {0} has no finished image to verify")]
    NothingToVerify(JobId),
    /// A series' contact sheet could not be made.
    #[error("series {series}: {source}")]
    ContactSheet {
        /// The series.
        series: String,
        /// Why.
        source: ContactSheetError,
    },
    /// The coordinator is stopping; the call can be made again elsewhere or later.
    #[error("the coordinator is shutting down; watch again from your cursor")]
    ShuttingDown,
    /// Leases were claimed but their answer could not be built (a deduplicated
    /// image not published, an input image unreadable); they were handed back.
    /// Never `NOT_FOUND`, whatever the cause: a worker takes that answer to a
    /// Lease as "your session is gone" and registers again, dropping its work.
    #[error("the leased tasks could not be sent and were handed back: {0}")]
    LeaseNotSent(Box<CoordinatorError>),
    /// The request carries no token, or one the coordinator does not know.
    #[error("{0}")]
    Unauthenticated(AuthError),
    /// The caller's role does not allow the action.
    #[error("permission denied: token {caller} may not {action}")]
    PermissionDenied {
        /// The token's name and role.
        caller: String,
        /// What it tried.
        action: String,
    },
    /// A project limit of the auth file refuses the job.
    #[error("project {project}: {limit} is {max}, {}this job adds {adds}", .has.map(|n| format!("it has {n} and ")).unwrap_or_default())]
    QuotaExceeded {
        /// The project.
        project: String,
        /// The limit's name in the auth file.
        limit: &'static str,
        /// Its value.
        max: u64,
        /// What the project holds now, for a limit on the project as a whole.
        has: Option<u64>,
        /// The tasks the job would add.
        adds: u64,
    },
}

impl CoordinatorError {
    /// Returns true when the same call may succeed later without any change:
    /// the store or the result store was unreachable, or the coordinator is
    /// stopping.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_retryable(),
            Self::ResultStore(e) => e.is_transient(),
            Self::ShuttingDown => true,
            Self::LeaseNotSent(inner) => inner.is_transient(),
            _ => false,
        }
    }
}

/// Result of a coordinator step.
pub type CoordinatorResult<T> = Result<T, CoordinatorError>;

/// A worker's report on a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// A finished image.
    Complete,
    /// A failure.
    Fail,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Report::Complete => "complete",
            Report::Fail => "fail",
        })
    }
}

/// Why a report under some epoch was refused, read from the task as the
/// store holds it after the refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StaleRefusal {
    /// The job was cancelled.
    Cancelled,
    /// The task already has its image.
    Completed {
        /// The epoch whose image was accepted.
        epoch: Epoch,
        /// The epoch of the refused report.
        reported: Epoch,
    },
    /// The task failed for good.
    Failed,
    /// The reported epoch is newer than any the store handed out: a worker
    /// bug or a report meant for another farm, never a lost race.
    NeverIssued {
        /// The epoch of the refused report.
        reported: Epoch,
        /// The task's newest epoch.
        current: Epoch,
        /// The task is leased under `current` (rather than queued).
        leased: bool,
    },
    /// Another lease of the task is current: `holder` holds it under `current`.
    Held {
        /// The epoch of the refused report.
        reported: Epoch,
        /// The current lease's epoch.
        current: Epoch,
        /// Who holds it (possibly the reporting worker, under a newer epoch).
        holder: WorkerId,
    },
    /// The lease expired and the task waits in the queue.
    Requeued {
        /// The epoch of the refused report.
        reported: Epoch,
        /// The task's newest epoch.
        current: Epoch,
    },
    /// The task as read now does not explain the refusal (it changed in
    /// between): the store's own words.
    Store(String),
}

impl StaleRefusal {
    /// Explains why `worker`'s report under `reported` on `task` was refused;
    /// `store_reason` is what the store said, kept for a task that changed
    /// since.
    pub fn of(task: &TaskRecord, worker: &WorkerId, reported: Epoch, store_reason: String) -> Self {
        Self::explain(
            task.state,
            task.epoch,
            task.holder(),
            worker,
            reported,
            store_reason,
        )
    }

    /// [`StaleRefusal::of`] on the facts it reads from the task.
    fn explain(
        state: TaskState,
        current: Epoch,
        holder: Option<&WorkerId>,
        worker: &WorkerId,
        reported: Epoch,
        store_reason: String,
    ) -> Self {
        match state {
            TaskState::Cancelled => Self::Cancelled,
            TaskState::Completed => Self::Completed {
                epoch: current,
                reported,
            },
            TaskState::Failed => Self::Failed,
            _ if reported > current => Self::NeverIssued {
                reported,
                current,
                leased: state == TaskState::Leased,
            },
            TaskState::Leased => match holder {
                // The reporter holding this very lease cannot be refused: the
                // task changed between the refusal and this read.
                Some(holder) if holder != worker || reported != current => Self::Held {
                    reported,
                    current,
                    holder: holder.clone(),
                },
                _ => Self::Store(store_reason),
            },
            _ => Self::Requeued { reported, current },
        }
    }
}

impl fmt::Display for StaleRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cancelled => f.write_str("the job was cancelled"),
            Self::Completed { epoch, reported } => write!(
                f,
                "the task was already completed under epoch {epoch} (this report: epoch {reported})"
            ),
            Self::Failed => f.write_str("the task already failed for good"),
            Self::NeverIssued {
                reported,
                current,
                leased: true,
            } => write!(
                f,
                "epoch {reported} was never issued for this task; the current lease is epoch {current}"
            ),
            Self::NeverIssued {
                reported,
                current,
                leased: false,
            } => write!(
                f,
                "epoch {reported} was never issued for this task; its latest epoch is {current} and it is queued"
            ),
            Self::Held {
                reported,
                current,
                holder,
            } if reported == current => {
                write!(f, "worker {holder} holds this task under epoch {current}")
            }
            Self::Held {
                reported,
                current,
                holder,
            } => write!(
                f,
                "epoch {reported} is stale: worker {holder} holds this task under epoch {current}"
            ),
            Self::Requeued { reported, current } => write!(
                f,
                "epoch {reported} is stale: the lease expired and the task is queued again (its latest epoch is {current})"
            ),
            Self::Store(reason) => f.write_str(reason),
        }
    }
}

impl CoordinatorError {
    /// Returns the gRPC code a client gets for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidField(_) => Code::InvalidArgument,
            Self::Store(e) => match e {
                StoreError::JobNotFound(_)
                | StoreError::TaskNotFound(_)
                | StoreError::NoTaskAt { .. }
                | StoreError::UnknownWorker(_) => Code::NotFound,
                StoreError::WorkerBound(_) => Code::PermissionDenied,
                StoreError::Unavailable(_) => Code::Unavailable,
                StoreError::Backend(_) | StoreError::Corrupt(_) | StoreError::Misconfigured(_) => {
                    Code::Internal
                }
            },
            Self::ResultStore(e) if e.is_not_found() => Code::DataLoss,
            Self::ResultStore(e) if e.is_transient() => Code::Unavailable,
            Self::ResultStore(_) | Self::ContactSheet { .. } => Code::Internal,
            Self::Stale { .. } | Self::StillRunning(_) | Self::NothingToVerify(_) => {
                Code::FailedPrecondition
            }
            Self::ShuttingDown => Code::Unavailable,
            Self::LeaseNotSent(inner) if inner.is_transient() => Code::Unavailable,
            Self::LeaseNotSent(_) => Code::Internal,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::QuotaExceeded { .. } => Code::ResourceExhausted,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        let code = e.code();
        match e {
            CoordinatorError::InvalidField(field) => kiln_proto::status::invalid_argument(field),
            e => {
                if matches!(
                    &e,
                    CoordinatorError::Store(
                        StoreError::Unavailable(_)
                            | StoreError::Backend(_)
                            | StoreError::Corrupt(_)
                            | StoreError::Misconfigured(_)
                    )
                ) {
                    crate::metrics::store_error();
                }
                // The farm's own faults are logged here, once, whatever the handler.
                if matches!(code, Code::Internal | Code::DataLoss | Code::Unavailable) {
                    tracing::warn!(code = ?code, error = %e, "request failed");
                }
                Status::new(code, bounded(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal of `worker`'s report under `reported` on a task in
    /// `state` under `current`, held by `holder`.
    fn refusal(
        state: TaskState,
        current: u64,
        holder: &str,
        worker: &str,
        reported: u64,
    ) -> String {
        let holder = WorkerId(holder.into());
        StaleRefusal::explain(
            state,
            Epoch(current),
            (state == TaskState::Leased).then_some(&holder),
            &WorkerId(worker.into()),
            Epoch(reported),
            "the store's words".into(),
        )
        .to_string()
    }

    #[test]
    fn a_future_epoch_was_never_issued() {
        assert_eq!(
            refusal(TaskState::Leased, 5, "w1", "w1", 7),
            "epoch 7 was never issued for this task; the current lease is epoch 5"
        );
        assert!(refusal(TaskState::Queued, 5, "w1", "w1", 7).contains("never issued"));
    }

    #[test]
    fn an_old_epoch_names_the_holder_and_its_epoch() {
        for worker in ["w1", "w2"] {
            assert_eq!(
                refusal(TaskState::Leased, 5, "w1", worker, 4),
                "epoch 4 is stale: worker w1 holds this task under epoch 5"
            );
        }
        assert_eq!(
            refusal(TaskState::Leased, 5, "w1", "w2", 5),
            "worker w1 holds this task under epoch 5"
        );
        assert_eq!(
            refusal(TaskState::Leased, 5, "w1", "w1", 5),
            "the store's words"
        );
    }

    #[test]
    fn ended_tasks_say_how_they_ended() {
        assert_eq!(
            refusal(TaskState::Completed, 3, "w1", "w2", 2),
            "the task was already completed under epoch 3 (this report: epoch 2)"
        );
        assert_eq!(
            refusal(TaskState::Cancelled, 3, "w1", "w1", 3),
            "the job was cancelled"
        );
        assert!(refusal(TaskState::Queued, 4, "w1", "w1", 3).contains("queued again"));
    }

    #[test]
    fn a_stale_report_is_a_failed_precondition_naming_the_task() {
        let (job, task) = (JobId::new(), TaskId::new());
        let status = Status::from(CoordinatorError::Stale {
            job,
            task,
            worker: WorkerId("w1".into()),
            report: Report::Complete,
            refusal: StaleRefusal::Cancelled,
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            format!("job {job}: worker w1 cannot complete task {task}: the job was cancelled")
        );
    }

    #[test]
    fn messages_stay_under_the_metadata_limit() {
        let status = Status::from(CoordinatorError::ContactSheet {
            series: "s".repeat(100_000),
            source: ContactSheetError::Encode(image::ImageError::Limits(
                image::error::LimitError::from_kind(
                    image::error::LimitErrorKind::InsufficientMemory,
                ),
            )),
        });
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().len() <= kiln_proto::status::MAX_MESSAGE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn field_errors_carry_their_field() {
        let status = Status::from(CoordinatorError::from(FieldError::new("job_id", "bad")));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            kiln_proto::status::field_error(&status).map(|f| f.path),
            Some("job_id".to_string())
        );
    }
}
