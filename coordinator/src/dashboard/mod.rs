//! The web dashboard on the coordinator's HTTP side: server-rendered pages
//! (jobs, a job with its gallery, an image with its recipe, workers, the
//! queue), the images they show, the buttons that steer jobs and workers,
//! and the Server-Sent Events that keep them live. No build step: the CSS
//! and the little JavaScript are compiled into the binary
//! ([`assets`](self::assets)).
//!
//! Who is calling is decided for every request by [`session::visitor`]:
//! with `--auth`, the token of the login form kept in an HttpOnly,
//! SameSite=Strict cookie (Secure over TLS), or an `Authorization: Bearer`
//! header; without `--auth`, the implicit admin, as on gRPC. Every page and
//! endpoint then asks the same [`Caller`](crate::auth::Caller) checks as the
//! `Farm` service ([`crate::control`]); every POST also carries the
//! session's CSRF token ([`session::check_csrf`]).
//!
//! Every list is paginated ([`PAGE`] rows), so the pages stay small at
//! thousands of jobs and hundreds of workers.

mod actions;
mod assets;
mod events;
mod html;
mod images;
mod job;
mod jobs;
mod session;
mod workers;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::core::Core;
use crate::error::CoordinatorError;

pub use session::http_caller;

/// Rows per page of every list (jobs, gallery, workers, failed tasks).
pub const PAGE: usize = 50;

/// What every dashboard handler shares.
#[derive(Clone)]
pub(crate) struct Dashboard {
    core: Arc<Core>,
    /// Cookies carry `Secure`: the dashboard is served over TLS.
    secure: bool,
    thumbnails: Arc<images::Thumbnails>,
}

/// Returns the dashboard's routes, to be merged into the HTTP side door.
/// `secure`: the side door is served over TLS, so cookies are marked
/// `Secure`.
pub fn router(core: Arc<Core>, secure: bool) -> Router {
    let state = Dashboard {
        core,
        secure,
        thumbnails: Arc::new(images::Thumbnails::default()),
    };
    Router::new()
        .route("/", get(jobs::page))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/jobs/{job}", get(job::page))
        .route("/jobs/{job}/images/{index}", get(job::image_page))
        .route("/jobs/{job}/cancel", post(actions::cancel))
        .route("/jobs/{job}/retry", post(actions::retry))
        .route("/jobs/{job}/verify", post(actions::verify))
        .route("/workers", get(workers::page))
        .route("/workers/{worker}/drain", post(actions::drain))
        .route("/queue", get(workers::queue_page))
        .route("/static/{file}", get(assets::serve))
        .route("/api/v1/events", get(events::stream))
        .route("/api/v1/jobs/{job}/images/{index}", get(images::image))
        .route("/api/v1/jobs/{job}/sheets/{series}", get(images::sheet))
        .with_state(state)
}

/// Why a dashboard request gets no page.
pub(crate) enum Refusal {
    /// No session (or a token the auth file no longer knows): log in.
    Login,
    /// A refusal with its status and one line.
    Status(StatusCode, String),
}

impl From<CoordinatorError> for Refusal {
    fn from(e: CoordinatorError) -> Self {
        // The one mapping of errors to gRPC codes decides the HTTP status too.
        let status = tonic::Status::from(e);
        let code = match status.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => StatusCode::CONFLICT,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal::Status(code, status.message().to_string())
    }
}

impl From<crate::store::StoreError> for Refusal {
    fn from(e: crate::store::StoreError) -> Self {
        CoordinatorError::from(e).into()
    }
}

impl Refusal {
    /// The answer to a browser asking for a page: the login form, or an
    /// error page.
    fn page(self) -> Response {
        match self {
            Refusal::Login => Redirect::to("/login").into_response(),
            Refusal::Status(code, line) => (
                code,
                html::bare_page("kiln: error", &html::error_body(code, &line)),
            )
                .into_response(),
        }
    }

    /// The answer to a script or an `<img>`: a status and one line.
    fn plain(self) -> Response {
        match self {
            Refusal::Login => (
                StatusCode::UNAUTHORIZED,
                "no session: log in at /login or send `authorization: Bearer TOKEN`\n",
            )
                .into_response(),
            Refusal::Status(code, line) => (code, format!("{line}\n")).into_response(),
        }
    }
}

#[cfg(test)]
mod tests;
