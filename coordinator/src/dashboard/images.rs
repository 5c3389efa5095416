//! The images the pages show: a finished image in full, its thumbnail
//! (scaled once, kept in a bounded memory cache, and marked immutable for
//! browsers: a finished image never changes), and a series' contact sheet.
//! Each answer checks first that the caller may read the job.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use image::ImageFormat;

use super::job::job_id;
use super::session::visitor;
use super::{Dashboard, Refusal};
use crate::auth::Action;
use crate::control;
use crate::core::contact_sheet_path;
use crate::error::CoordinatorError;

/// The longest side of a thumbnail, in pixels.
pub const THUMB_SIDE: u32 = 192;
/// Thumbnails kept in memory, the oldest dropped first.
const CACHED_THUMBNAILS: usize = 1024;
/// A finished image never changes: browsers may keep it for a day.
const IMMUTABLE: &str = "private, max-age=86400, immutable";

/// Thumbnails by the sha256 of their image: a bounded cache, oldest out.
#[derive(Default)]
pub(crate) struct Thumbnails {
    inner: Mutex<(HashMap<String, Bytes>, VecDeque<String>)>,
}

impl Thumbnails {
    fn get(&self, sha256: &str) -> Option<Bytes> {
        self.inner.lock().ok()?.0.get(sha256).cloned()
    }

    fn put(&self, sha256: &str, png: Bytes) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let (map, order) = &mut *inner;
        if map.insert(sha256.to_string(), png).is_none() {
            order.push_back(sha256.to_string());
        }
        while order.len() > CACHED_THUMBNAILS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }
}

/// Scales a PNG so that its longer side is at most [`THUMB_SIDE`].
///
/// # Errors
/// When the bytes are not a decodable image.
pub fn thumbnail(png: &[u8]) -> Result<Vec<u8>, image::ImageError> {
    let img = image::load_from_memory_with_format(png, ImageFormat::Png)?;
    let small = if img.width().max(img.height()) > THUMB_SIDE {
        img.thumbnail(THUMB_SIDE, THUMB_SIDE)
    } else {
        img
    };
    let mut out = std::io::Cursor::new(Vec::new());
    small.write_to(&mut out, ImageFormat::Png)?;
    Ok(out.into_inner())
}

fn png(bytes: Bytes, etag: &str) -> Response {
    let mut response = bytes.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    if let Ok(tag) = HeaderValue::from_str(&format!("\"{etag}\"")) {
        h.insert(header::ETAG, tag);
    }
    response
}

/// `GET /api/v1/jobs/{job}/images/{index}[?thumb=1]`: a finished image, or
/// its thumbnail.
pub(crate) async fn image(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path((job, index)): Path<(String, u32)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let answer = async {
        let v = visitor(&d, &headers)?;
        let id = job_id(&job)?;
        control::job_for(&d.core, &v.caller, id, Action::Read).await?;
        let task = d.core.store.task_at(id, index).await?;
        let result = task.result.as_ref().ok_or_else(|| {
            Refusal::Status(
                StatusCode::NOT_FOUND,
                format!("image {index} of job {id} is not finished"),
            )
        })?;
        let thumb = q.get("thumb").is_some_and(|t| t == "1");
        let etag = if thumb {
            format!("{}-thumb", result.sha256)
        } else {
            result.sha256.clone()
        };
        if headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_matches('"') == etag)
        {
            return Ok(StatusCode::NOT_MODIFIED.into_response());
        }
        if thumb && let Some(small) = d.thumbnails.get(&result.sha256) {
            return Ok(png(small, &etag));
        }
        let folder = d.core.folder(id).await?;
        let bytes = d
            .core
            .results
            .read_image(&folder, &task.file_name, &result.object)
            .await
            .map_err(CoordinatorError::from)?;
        if !thumb {
            return Ok(png(bytes, &etag));
        }
        let small = tokio::task::spawn_blocking(move || thumbnail(&bytes))
            .await
            .map_err(|e| Refusal::Status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| {
                Refusal::Status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("image {index} of job {id} cannot be decoded: {e}"),
                )
            })?;
        let small = Bytes::from(small);
        d.thumbnails.put(&result.sha256, small.clone());
        Ok::<_, Refusal>(png(small, &etag))
    };
    answer.await.unwrap_or_else(Refusal::plain)
}

/// `GET /api/v1/jobs/{job}/sheets/{series}`: a series' contact sheet, once
/// the job has ended.
pub(crate) async fn sheet(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path((job, series)): Path<(String, String)>,
) -> Response {
    let answer = async {
        let v = visitor(&d, &headers)?;
        let id = job_id(&job)?;
        let record = control::job_for(&d.core, &v.caller, id, Action::Read).await?;
        kiln_proto::recipe::check_name("series", &series)
            .map_err(|e| Refusal::Status(StatusCode::BAD_REQUEST, e.to_string()))?;
        let folder = crate::results::folder(record.id, record.verify_of);
        let bytes = d
            .core
            .results
            .get_artifact(&folder, &contact_sheet_path(&series))
            .await
            .map_err(CoordinatorError::from)?
            .ok_or_else(|| {
                Refusal::Status(
                    StatusCode::NOT_FOUND,
                    format!("job {id} has no contact sheet of series {series:?}"),
                )
            })?;
        let etag = kiln_domain::image::sha256_hex(&bytes);
        Ok::<_, Refusal>(png(bytes, &etag))
    };
    answer.await.unwrap_or_else(Refusal::plain)
}
