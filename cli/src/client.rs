//! The CLI's connection to a coordinator's Farm service, with a deadline on every call.

use std::time::Duration;

use kiln_proto::connect::{
    AuthChannel, Bearer, TlsOptions, channel, error_chain, farm_client, is_tls_failure,
    with_deadline,
};
use kiln_proto::error::FieldError;
use kiln_proto::pb::{self, farm_client::FarmClient};
use tonic::{Code, Status, Streaming};

/// Deadline of unary calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for a stream's first answer; the stream itself runs as long as it has data.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A Farm client bound to one coordinator.
#[derive(Clone)]
pub struct Farm {
    client: FarmClient<AuthChannel>,
    url: String,
    /// Whether a connection is TLS without a client certificate: a
    /// coordinator that requires one closes it after the handshake.
    tls_without_identity: bool,
}

impl Farm {
    /// Returns a client for the coordinator at `url` (connects on first
    /// call), over TLS configured from `tls` for an `https://` URL, sending
    /// `token` with every call.
    pub fn new(url: &str, tls: &TlsOptions, token: Bearer) -> anyhow::Result<Self> {
        Ok(Self {
            client: farm_client(channel("--coordinator", url, tls)?, token),
            url: url.to_string(),
            tls_without_identity: url.starts_with("https://") && tls.cert.is_none(),
        })
    }

    /// Wraps a failed call in an error that says which coordinator and, for
    /// an unreachable one, what to check. The hint is only for a call that
    /// got no answer: a status the coordinator sent (a store that failed, a
    /// shutdown) is its own explanation. A transport failure keeps its whole
    /// cause chain (where a TLS handshake or a certificate was refused).
    pub fn explain(&self, status: Status) -> anyhow::Error {
        if unanswered(&status) {
            let mut cause = status.message().to_string();
            if let Some(source) = std::error::Error::source(&status) {
                let chain = error_chain(source);
                if chain.contains(&cause) {
                    cause = chain;
                } else if !cause.contains(&chain) {
                    cause = format!("{cause}: {chain}");
                }
            }
            let source = std::error::Error::source(&status);
            let hint = if source.is_some_and(is_tls_failure) {
                "hint: a TLS/certificate problem: trust the CA that signed the coordinator's certificate with --ca or KILN_CA; a coordinator started with --tls-client-ca also needs --tls-cert and --tls-key (KILN_TLS_CERT, KILN_TLS_KEY)."
            } else if self.tls_without_identity && !source.is_some_and(refused) {
                // TLS 1.3 reports a missing client certificate only after the
                // handshake, as a connection the coordinator closes.
                "hint: is kiln-coordinator running there? A coordinator that requires client certificates (mutual TLS, --tls-client-ca) closes connections from clients without one: set --tls-cert and --tls-key (KILN_TLS_CERT, KILN_TLS_KEY)."
            } else {
                "hint: is kiln-coordinator running there? Set --coordinator or KILN_COORDINATOR (https:// for a coordinator that serves TLS)."
            };
            return anyhow::anyhow!(
                "cannot reach the coordinator at {}: {cause}\n{hint}",
                self.url,
            );
        }
        match status.code() {
            Code::Unauthenticated => anyhow::anyhow!(
                "the coordinator at {} refused the call: {}\nhint: give a token with KILN_TOKEN or --token-file FILE (make one with `kiln token new`, and add its block to the coordinator's --auth file).",
                self.url,
                status.message()
            ),
            Code::PermissionDenied => anyhow::anyhow!(
                "the coordinator at {} refused the call: {}\nhint: this token's role does not allow it; use another token with KILN_TOKEN or --token-file FILE.",
                self.url,
                status.message()
            ),
            Code::Unavailable | Code::Internal | Code::DataLoss | Code::Unknown => anyhow::anyhow!(
                "the coordinator at {} failed: {}",
                self.url,
                status.message()
            ),
            _ => anyhow::anyhow!("{}", status.message()),
        }
    }

    /// Returns the rejected field of an `INVALID_ARGUMENT` answer, from the
    /// status details the coordinator attaches.
    pub fn rejected_field(status: &Status) -> Option<FieldError> {
        if status.code() != Code::InvalidArgument {
            return None;
        }
        kiln_proto::status::field_error(status)
    }

    async fn unary<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer within {CALL_TIMEOUT:?}"
            ))),
        }
    }

    /// Submits a job.
    pub async fn submit(&self, req: pb::SubmitJobRequest) -> Result<pb::SubmitJobResponse, Status> {
        let mut c = self.client.clone();
        self.unary(c.submit_job(with_deadline(req, CALL_TIMEOUT)))
            .await
    }

    /// Returns a job, with its tasks if asked.
    pub async fn job(
        &self,
        job_id: &str,
        include_tasks: bool,
    ) -> Result<pb::GetJobResponse, Status> {
        let req = pb::GetJobRequest {
            job_id: job_id.to_string(),
            include_tasks,
        };
        let mut c = self.client.clone();
        self.unary(c.get_job(with_deadline(req, CALL_TIMEOUT)))
            .await
    }

    /// Lists jobs, newest first.
    pub async fn jobs(&self, limit: u32) -> Result<Vec<pb::JobSummary>, Status> {
        let mut c = self.client.clone();
        let req = pb::ListJobsRequest { limit };
        Ok(self
            .unary(c.list_jobs(with_deadline(req, CALL_TIMEOUT)))
            .await?
            .jobs)
    }

    /// Lists workers.
    pub async fn workers(&self) -> Result<Vec<pb::WorkerSummary>, Status> {
        let mut c = self.client.clone();
        let req = pb::ListWorkersRequest {};
        Ok(self
            .unary(c.list_workers(with_deadline(req, CALL_TIMEOUT)))
            .await?
            .workers)
    }

    /// Lists the farm's models.
    pub async fn models(&self) -> Result<Vec<pb::ModelSummary>, Status> {
        let mut c = self.client.clone();
        let req = pb::ListModelsRequest {};
        Ok(self
            .unary(c.list_models(with_deadline(req, CALL_TIMEOUT)))
            .await?
            .models)
    }

    /// Cancels a job.
    pub async fn cancel(&self, job_id: &str) -> Result<pb::JobSummary, Status> {
        let mut c = self.client.clone();
        let req = pb::CancelJobRequest {
            job_id: job_id.to_string(),
        };
        self.unary(c.cancel_job(with_deadline(req, CALL_TIMEOUT)))
            .await?
            .job
            .ok_or_else(|| Status::internal("the coordinator returned no job"))
    }

    /// Puts a job's failed tasks back in the queue; returns the job and how many went back.
    pub async fn retry(&self, job_id: &str) -> Result<(pb::JobSummary, u32), Status> {
        let mut c = self.client.clone();
        let req = pb::RetryJobRequest {
            job_id: job_id.to_string(),
        };
        let r = self
            .unary(c.retry_job(with_deadline(req, CALL_TIMEOUT)))
            .await?;
        let job = r
            .job
            .ok_or_else(|| Status::internal("the coordinator returned no job"))?;
        Ok((job, r.requeued))
    }

    /// Pauses (`paused`) or resumes a job.
    pub async fn pause(&self, job_id: &str, paused: bool) -> Result<pb::JobSummary, Status> {
        let mut c = self.client.clone();
        let req = pb::PauseJobRequest {
            job_id: job_id.to_string(),
            paused,
        };
        self.unary(c.pause_job(with_deadline(req, CALL_TIMEOUT)))
            .await?
            .job
            .ok_or_else(|| Status::internal("the coordinator returned no job"))
    }

    /// Sets a job's priority.
    pub async fn set_priority(
        &self,
        job_id: &str,
        priority: i32,
    ) -> Result<pb::JobSummary, Status> {
        let mut c = self.client.clone();
        let req = pb::SetJobPriorityRequest {
            job_id: job_id.to_string(),
            priority,
        };
        self.unary(c.set_job_priority(with_deadline(req, CALL_TIMEOUT)))
            .await?
            .job
            .ok_or_else(|| Status::internal("the coordinator returned no job"))
    }

    /// Reads usage per project and model from the day holding `since_ms` (0: all).
    pub async fn usage(
        &self,
        project: &str,
        since_ms: i64,
    ) -> Result<pb::GetUsageResponse, Status> {
        let mut c = self.client.clone();
        let req = pb::GetUsageRequest {
            project: project.to_string(),
            since_ms,
        };
        self.unary(c.get_usage(with_deadline(req, CALL_TIMEOUT)))
            .await
    }

    /// Drains a worker.
    pub async fn drain(&self, worker_id: &str) -> Result<pb::WorkerSummary, Status> {
        let mut c = self.client.clone();
        let req = pb::DrainWorkerRequest {
            worker_id: worker_id.to_string(),
        };
        self.unary(c.drain_worker(with_deadline(req, CALL_TIMEOUT)))
            .await?
            .worker
            .ok_or_else(|| Status::internal("the coordinator returned no worker"))
    }

    /// Asks for a verification job of a finished job.
    pub async fn verify(&self, job_id: &str, sample: u32) -> Result<pb::VerifyJobResponse, Status> {
        let mut c = self.client.clone();
        let req = pb::VerifyJobRequest {
            job_id: job_id.to_string(),
            sample,
        };
        self.unary(c.verify_job(with_deadline(req, CALL_TIMEOUT)))
            .await
    }

    /// Opens a job's event stream after `cursor`.
    pub async fn watch(
        &self,
        job_id: &str,
        cursor: u64,
        previews: bool,
    ) -> Result<Streaming<pb::WatchJobResponse>, Status> {
        let mut c = self.client.clone();
        let req = pb::WatchJobRequest {
            job_id: job_id.to_string(),
            after_cursor: cursor,
            previews,
        };
        self.unary(c.watch_job(req)).await
    }

    /// Opens a job's result stream.
    pub async fn fetch(
        &self,
        req: pb::FetchResultsRequest,
    ) -> Result<Streaming<pb::FetchResultsResponse>, Status> {
        let mut c = self.client.clone();
        match tokio::time::timeout(STREAM_OPEN_TIMEOUT, c.fetch_results(req)).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded("the result stream did not open")),
        }
    }
}

/// Returns true when a call failed without an answer from the coordinator:
/// tonic's transport errors (no connection, a connection that broke) keep
/// their cause as the status's source, which a status read off the wire
/// never has; a deadline is this client's own, set in this module.
fn unanswered(status: &Status) -> bool {
    status.code() == Code::DeadlineExceeded || std::error::Error::source(status).is_some()
}

/// Returns true when a connection was refused: nothing listens there.
fn refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Reads the next message of a stream, failing if none arrives within `idle`.
pub async fn next_within<T>(
    stream: &mut Streaming<T>,
    idle: Duration,
) -> Result<Option<T>, Status> {
    match tokio::time::timeout(idle, stream.message()).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the coordinator sent nothing for {idle:?}"
        ))),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    const HINT: &str = "is kiln-coordinator running";

    #[tokio::test]
    async fn only_a_call_without_an_answer_gets_the_connection_hint() {
        let farm = Farm::new("http://127.0.0.1:1", &TlsOptions::default(), Bearer::none()).unwrap();
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let transport = Status::from_error(Box::new(refused));
        assert!(farm.explain(transport).to_string().contains(HINT));
        let late = Status::deadline_exceeded("no answer within 30s");
        assert!(farm.explain(late).to_string().contains(HINT));

        let lost = Status::data_loss("result store: cannot read j/00001-x.png: not found");
        let text = farm.explain(lost).to_string();
        assert!(!text.contains(HINT), "{text}");
        assert!(
            text.contains("result store: cannot read j/00001-x.png"),
            "{text}"
        );
        let stopping = Status::unavailable("the coordinator is shutting down");
        assert!(!farm.explain(stopping).to_string().contains(HINT));
    }

    #[test]
    fn coordinator_refusals_are_located_by_their_field() {
        let text = "[defaults]\nmodel = \"tiny\"\nprompt = \"a fox\"\n";
        let batch = kiln_domain::batch::Batch::parse("b.toml", text).unwrap();
        let status = kiln_proto::status::invalid_argument(FieldError::new(
            "defaults.model",
            "unknown model \"tiny\"; the farm knows sd15",
        ));
        let field = Farm::rejected_field(&status).unwrap();
        let e = batch.locate(&field);
        assert_eq!((e.line, e.path.as_str()), (Some(2), "defaults.model"));
        assert!(e.message.starts_with("unknown model"), "{e}");
        let bare = tonic::Status::invalid_argument("defaults.model: no details");
        assert!(Farm::rejected_field(&bare).is_none());
    }
}
