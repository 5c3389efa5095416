//! Sessions: who is calling ([`visitor`]), the login form, logout, and the
//! CSRF token every POST must carry.
//!
//! Two cookies, both HttpOnly and SameSite=Strict, and Secure when the
//! dashboard is served over TLS:
//! - `kiln_token`: the token entered in the login form (only with `--auth`);
//!   checked against the auth file in force at every request, so a token
//!   removed from it (SIGHUP) ends its sessions at once;
//! - `kiln_csrf`: 32 random bytes, made for each new session (and at login
//!   and logout), that every form repeats in its hidden `csrf` field (or a
//!   script in the `x-kiln-csrf` header). A POST whose field does not match
//!   its cookie is refused (403) before anything else is read.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq;

use super::{Dashboard, Refusal, html};
use crate::auth::{Auth, AuthError, Caller};

/// The session cookie: the token of the login form.
pub const TOKEN_COOKIE: &str = "kiln_token";
/// The CSRF cookie, repeated by every form.
pub const CSRF_COOKIE: &str = "kiln_csrf";
/// The form field that repeats the CSRF cookie.
pub const CSRF_FIELD: &str = "csrf";
/// The header a script may repeat it in instead.
pub const CSRF_HEADER: &str = "x-kiln-csrf";
/// How long a login lasts in the browser.
const SESSION_SECONDS: u64 = 12 * 3600;
/// Longest token the login form takes.
const MAX_TOKEN: usize = 512;

/// Who is calling and the session's CSRF token.
pub(crate) struct Visitor {
    /// The caller, as gRPC would see the same token.
    pub caller: Caller,
    /// The session's CSRF token.
    pub csrf: String,
    /// The CSRF cookie is new: the answer must set it.
    pub new_csrf: bool,
}

impl Visitor {
    /// The `Set-Cookie` of a new CSRF token, when this answer must carry one.
    pub fn set_cookie(&self, d: &Dashboard) -> Option<HeaderValue> {
        self.new_csrf
            .then(|| cookie(d, CSRF_COOKIE, &self.csrf, Some(SESSION_SECONDS)))
    }
}

/// Returns the value of cookie `name`.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value; `max_age` `Some(0)` deletes, `None` lasts the
/// browser session.
fn cookie(d: &Dashboard, name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let mut text = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        text.push_str(&format!("; Max-Age={age}"));
    }
    if d.secure {
        text.push_str("; Secure");
    }
    // Names and values are cookie-safe: checked at login, or hex.
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""))
}

/// 32 random bytes, hex.
fn random_token() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        // No OS randomness: a session without a CSRF secret must not exist.
        tracing::error!("the OS random source failed; the dashboard cannot make a CSRF token");
        return String::new();
    }
    hex::encode(bytes)
}

/// The session's CSRF token from its cookie, or a new one.
fn csrf_of(headers: &HeaderMap) -> (String, bool) {
    match cookie_value(headers, CSRF_COOKIE) {
        Some(v) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (v.to_string(), false)
        }
        _ => (random_token(), true),
    }
}

/// Returns who is calling: the session cookie's token or a bearer token,
/// judged by the auth file in force; the implicit admin without `--auth`.
///
/// # Errors
/// [`Refusal::Login`] with `--auth` and no known token.
pub(crate) fn visitor(d: &Dashboard, headers: &HeaderMap) -> Result<Visitor, Refusal> {
    let (csrf, new_csrf) = csrf_of(headers);
    let caller = http_caller(&d.core.auth, headers).map_err(|_| Refusal::Login)?;
    Ok(Visitor {
        caller,
        csrf,
        new_csrf,
    })
}

/// Returns the caller of an HTTP request to the side door: its
/// `Authorization: Bearer` token, else the dashboard session's cookie,
/// judged by the auth file in force; the implicit admin without `--auth`.
/// For every endpoint a browser page reaches with its cookie (images,
/// previews, events).
///
/// # Errors
/// With `--auth`, a request without a token, or with one the file does
/// not know.
pub fn http_caller(auth: &Auth, headers: &HeaderMap) -> Result<Caller, AuthError> {
    if headers.contains_key(header::AUTHORIZATION) {
        // The one parser of `Bearer TOKEN`, as for gRPC calls.
        return auth.authenticate(&tonic::metadata::MetadataMap::from_headers(headers.clone()));
    }
    if !auth.is_on() {
        return Ok(Caller::implicit_admin());
    }
    let token = cookie_value(headers, TOKEN_COOKIE).ok_or(AuthError::Missing)?;
    auth.caller_of_token(token.trim())
}

/// Checks the CSRF token a POST repeats (form field or header) against its
/// cookie, in constant time.
///
/// # Errors
/// 403 with one line when either is missing or they differ.
pub(crate) fn check_csrf(headers: &HeaderMap, form: &[(String, String)]) -> Result<(), Refusal> {
    let refused = || {
        Refusal::Status(
            StatusCode::FORBIDDEN,
            "CSRF check failed: reload the page and try again".to_string(),
        )
    };
    let cookie = cookie_value(headers, CSRF_COOKIE).ok_or_else(refused)?;
    let sent = form
        .iter()
        .find(|(k, _)| k == CSRF_FIELD)
        .map(|(_, v)| v.as_str())
        .or_else(|| headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()))
        .ok_or_else(refused)?;
    if cookie.len() == 64 && bool::from(cookie.as_bytes().ct_eq(sent.as_bytes())) {
        Ok(())
    } else {
        Err(refused())
    }
}

/// Parses an `application/x-www-form-urlencoded` body.
pub(crate) fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// `GET /login`: the form (without `--auth`, the jobs page).
pub(crate) async fn login_page(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    if !d.core.auth.is_on() {
        return Redirect::to("/").into_response();
    }
    let (csrf, new_csrf) = csrf_of(&headers);
    login_answer(&d, StatusCode::OK, &csrf, new_csrf, None)
}

fn login_answer(
    d: &Dashboard,
    code: StatusCode,
    csrf: &str,
    new_csrf: bool,
    problem: Option<&str>,
) -> Response {
    let mut response = (
        code,
        html::bare_page("kiln: log in", &html::login_body(csrf, problem)),
    )
        .into_response();
    if new_csrf {
        response.headers_mut().append(
            header::SET_COOKIE,
            cookie(d, CSRF_COOKIE, csrf, Some(SESSION_SECONDS)),
        );
    }
    response
}

/// `POST /login`: checks the CSRF field and the token, then sets the
/// session cookie and a fresh CSRF token, and goes to the jobs page.
pub(crate) async fn login(State(d): State<Dashboard>, headers: HeaderMap, body: Bytes) -> Response {
    let fields = form(&body);
    if let Err(refusal) = check_csrf(&headers, &fields) {
        return refusal.page();
    }
    if !d.core.auth.is_on() {
        return Redirect::to("/").into_response();
    }
    let (csrf, _) = csrf_of(&headers);
    let token = fields
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim())
        .unwrap_or("");
    let cookie_safe = !token.is_empty()
        && token.len() <= MAX_TOKEN
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'));
    let caller = match cookie_safe
        .then(|| d.core.auth.caller_of_token(token).ok())
        .flatten()
    {
        Some(caller) => caller,
        None => {
            tracing::info!("dashboard login refused: unknown token");
            return login_answer(
                &d,
                StatusCode::UNAUTHORIZED,
                &csrf,
                false,
                Some("unknown token: the coordinator's --auth file has no such token"),
            );
        }
    };
    tracing::info!(token = %caller.name, role = %caller.role, "dashboard login");
    let mut response = Redirect::to("/").into_response();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        cookie(&d, TOKEN_COOKIE, token, Some(SESSION_SECONDS)),
    );
    headers.append(
        header::SET_COOKIE,
        cookie(&d, CSRF_COOKIE, &random_token(), Some(SESSION_SECONDS)),
    );
    response
}

/// `POST /logout`: forgets the session's cookies.
pub(crate) async fn logout(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = check_csrf(&headers, &form(&body)) {
        return refusal.page();
    }
    let mut response = Redirect::to("/login").into_response();
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, cookie(&d, TOKEN_COOKIE, "", Some(0)));
    headers.append(header::SET_COOKIE, cookie(&d, CSRF_COOKIE, "", Some(0)));
    response
}
