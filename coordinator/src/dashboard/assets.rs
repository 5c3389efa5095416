//! The dashboard's stylesheet and script, compiled into the binary
//! (`assets/`): no Node, no build step, nothing fetched from elsewhere.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `dashboard.css`.
pub const CSS: &str = include_str!("assets/dashboard.css");
/// `dashboard.js`: live updates (SSE) and the preview fallback.
pub const JS: &str = include_str!("assets/dashboard.js");

/// `GET /static/{file}`: open to all, like any stylesheet.
pub(crate) async fn serve(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "dashboard.css" => (CSS, "text/css; charset=utf-8"),
        "dashboard.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        body,
    )
        .into_response()
}
