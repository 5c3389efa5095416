//! Webhook targets: the one rule for a URL kiln may POST to when a job ends,
//! whether it comes from a batch file (`notify = [...]`) or the
//! coordinator's `--webhook` flag.
//!
//! The rule is about the URL's shape only (http or https, a host, no
//! credentials). Whether the host resolves to a private address is decided
//! by the coordinator at delivery time, since a name can resolve elsewhere
//! later.

use crate::error::{FieldError, quote};

/// Most webhook URLs one job may name.
pub const MAX_TARGETS: usize = 8;

/// Longest accepted webhook URL, in bytes.
pub const MAX_URL_BYTES: usize = 2048;

/// A webhook URL taken apart: what delivery needs to check and call it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// `http` or `https`, lower case.
    pub scheme: &'static str,
    /// The host: a name, an IPv4 address, or an IPv6 address without brackets.
    pub host: &'a str,
    /// The port, written or the scheme's default.
    pub port: u16,
}

/// Checks the webhook URLs of a job: at most [`MAX_TARGETS`], each as
/// [`parse_target`] wants it.
///
/// # Errors
/// `notify` for too many, `notify[i]` for a bad one.
pub fn check_targets(urls: &[String]) -> Result<(), FieldError> {
    if urls.len() > MAX_TARGETS {
        return Err(FieldError::new(
            "notify",
            format!(
                "names {} URLs, more than the limit of {MAX_TARGETS}",
                urls.len()
            ),
        ));
    }
    for (i, url) in urls.iter().enumerate() {
        parse_target(&format!("notify[{i}]"), url)?;
    }
    Ok(())
}

/// Reads a webhook URL: `http://` or `https://`, a host, an optional port,
/// no user name or password (the payload is signed instead), at most
/// [`MAX_URL_BYTES`] bytes without spaces or control characters.
///
/// # Errors
/// The field `field`, quoting the URL.
pub fn parse_target<'a>(field: &str, url: &'a str) -> Result<Target<'a>, FieldError> {
    let bad = |why: &str| FieldError::new(field, format!("{why}, got {}", quote(url)));
    if url.len() > MAX_URL_BYTES {
        return Err(bad(&format!(
            "must be at most {MAX_URL_BYTES} bytes ({} here)",
            url.len()
        )));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("must not contain spaces or control characters"));
    }
    let (scheme, rest) = match url.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("https") => ("https", rest),
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => ("http", rest),
        _ => return Err(bad("must be an http:// or https:// URL")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(bad(
            "must not carry a user name or password (the body is signed with --webhook-secret-file instead)",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(bad("has an IPv6 address without its closing ]"));
        };
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    let port = match port {
        None => {
            if scheme == "https" {
                443
            } else {
                80
            }
        }
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad("has a port that is not a number from 1 to 65535")),
        },
    };
    Ok(Target { scheme, host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls_are_taken_apart() {
        let t = parse_target("f", "https://studio.example/hooks/kiln").unwrap();
        assert_eq!((t.scheme, t.host, t.port), ("https", "studio.example", 443));
        let t = parse_target("f", "HTTP://127.0.0.1:8080/x?y=1").unwrap();
        assert_eq!((t.scheme, t.host, t.port), ("http", "127.0.0.1", 8080));
        let t = parse_target("f", "http://[::1]:9/").unwrap();
        assert_eq!((t.host, t.port), ("::1", 9));
    }

    #[test]
    fn bad_urls_are_named() {
        let e = parse_target("notify[1]", "ftp://studio.example/x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "notify[1]: must be an http:// or https:// URL, got \"ftp://studio.example/x\""
        );
        for (url, why) in [
            ("file:///etc/passwd", "http:// or https://"),
            ("https:///x", "no host"),
            ("https://u:p@host/x", "user name or password"),
            ("https://host:0/x", "port"),
            ("https://host:99999/x", "port"),
            ("https://host/a b", "spaces"),
            ("http://[::1/x", "closing ]"),
            ("studio.example/hook", "http:// or https://"),
        ] {
            let e = parse_target("notify[0]", url).unwrap_err();
            assert!(e.message.contains(why), "{url}: {e}");
            assert_eq!(e.path, "notify[0]");
        }
        let long = format!("https://h/{}", "a".repeat(MAX_URL_BYTES));
        assert!(parse_target("f", &long).unwrap_err().message.len() < 400);
    }

    #[test]
    fn a_job_names_at_most_eight() {
        let urls = vec!["https://h/x".to_string(); MAX_TARGETS + 1];
        assert_eq!(check_targets(&urls).unwrap_err().path, "notify");
        assert!(check_targets(&urls[..MAX_TARGETS]).is_ok());
        let e = check_targets(&["https://h/".into(), "gopher://h".into()]).unwrap_err();
        assert_eq!(e.path, "notify[1]");
    }
}
