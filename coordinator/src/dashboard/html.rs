//! HTML building blocks: escaping, the page frame with its navigation, the
//! login and error bodies, and the small formats (ages, durations, progress
//! bars, buttons) every page shares.

use std::fmt::Write as _;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::Dashboard;
use super::session::{CSRF_FIELD, Visitor};
use crate::auth::Role;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a value for a URL query or path segment.
pub fn url(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The content security policy of every page: scripts, styles and images
/// of this origin only.
const CSP: &str = "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

fn document(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/static/dashboard.css\">\
         <script src=\"/static/dashboard.js\" defer></script></head>\n<body>{body}</body></html>\n",
        esc(title)
    )
}

/// Security headers of every page.
fn harden(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A page without navigation (login, errors).
pub fn bare_page(title: &str, body: &str) -> Response {
    harden(
        Html(document(
            title,
            &format!("<main class=\"narrow\">{body}</main>"),
        ))
        .into_response(),
    )
}

/// A page of the dashboard: navigation (with the caller and logout), then
/// `body`; sets the CSRF cookie of a new session.
pub fn page(d: &Dashboard, visitor: &Visitor, title: &str, current: &str, body: &str) -> Response {
    let mut nav = String::from("<header><nav><strong class=\"brand\">kiln</strong>");
    for (href, label) in [("/", "Jobs"), ("/workers", "Workers"), ("/queue", "Queue")] {
        let class = if label == current {
            " class=\"here\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{href}\"{class}>{label}</a>");
    }
    let caller = &visitor.caller;
    if caller.authenticated {
        let _ = write!(
            nav,
            "<span class=\"who\">{} ({})</span><form method=\"post\" action=\"/logout\" class=\"inline\">{}<button>Log out</button></form>",
            esc(&caller.name),
            role_name(caller.role),
            csrf_field(visitor)
        );
    } else {
        nav.push_str("<span class=\"who\">open farm (no --auth)</span>");
    }
    nav.push_str("</nav></header>");
    let html = document(
        &format!("kiln: {title}"),
        &format!(
            "{nav}<main data-csrf=\"{}\">{body}</main>",
            esc(&visitor.csrf)
        ),
    );
    let mut response = harden(Html(html).into_response());
    if let Some(cookie) = visitor.set_cookie(d) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

fn role_name(role: Role) -> &'static str {
    role.as_str()
}

/// The hidden field that repeats the session's CSRF token.
pub fn csrf_field(visitor: &Visitor) -> String {
    format!(
        "<input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">",
        esc(&visitor.csrf)
    )
}

/// A button that POSTs to `action` with the CSRF token.
pub fn button(visitor: &Visitor, action: &str, label: &str, class: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}<button class=\"{class}\">{}</button></form>",
        esc(action),
        csrf_field(visitor),
        esc(label)
    )
}

/// The login form: one password field named `token`; Enter submits.
pub fn login_body(csrf: &str, problem: Option<&str>) -> String {
    let problem = problem
        .map(|p| format!("<p class=\"problem\">{}</p>", esc(p)))
        .unwrap_or_default();
    format!(
        "<h1>kiln</h1>{problem}<form method=\"post\" action=\"/login\" class=\"login\">\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus required></label>\
         <button>Log in</button></form>",
        esc(csrf)
    )
}

/// The body of an error page.
pub fn error_body(code: StatusCode, line: &str) -> String {
    format!(
        "<h1>{}</h1><p class=\"problem\">{}</p><p><a href=\"/\">Back to the jobs</a></p>",
        code.as_u16(),
        esc(line)
    )
}

/// "3 s", "4 min", "2 h", "5 d": how long ago or how long.
pub fn span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=89 => format!("{s} s"),
        90..=5399 => format!("{} min", (s + 30) / 60),
        5400..=172_799 => format!("{} h", (s + 1800) / 3600),
        _ => format!("{} d", (s + 43_200) / 86_400),
    }
}

/// A progress bar: done and failed parts of `total`.
pub fn progress(done: u32, failed: u32, total: u32) -> String {
    let pct = |n: u32| {
        if total == 0 {
            0.0
        } else {
            100.0 * f64::from(n) / f64::from(total)
        }
    };
    format!(
        "<span class=\"bar\" title=\"{done} of {total} done\"><progress max=\"{total}\" value=\"{}\">{:.0} %</progress></span>",
        done + failed,
        pct(done)
    )
}

/// Links to the other pages of a list: `base` ends with `?` or `&`.
pub fn pager(base: &str, page: usize, more: bool) -> String {
    if page == 0 && !more {
        return String::new();
    }
    let mut out = String::from("<nav class=\"pager\">");
    if page > 0 {
        let _ = write!(
            out,
            "<a href=\"{}page={}\">&larr; newer</a>",
            esc(base),
            page - 1
        );
    }
    let _ = write!(out, "<span>page {}</span>", page + 1);
    if more {
        let _ = write!(
            out,
            "<a href=\"{}page={}\">older &rarr;</a>",
            esc(base),
            page + 1
        );
    }
    out.push_str("</nav>");
    out
}
