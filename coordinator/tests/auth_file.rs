//! Property tests of the `--auth` file parser (`AuthTable::parse`), the
//! stable twin of the `auth_file` fuzz target: whatever the file holds, it is
//! refused with one short line that says which entry or which line is wrong,
//! never a panic; and a well-formed file finds every token it lists.
//!
//! 256 cases per property unless `PROPTEST_CASES` asks for another number.

use kiln_coordinator::auth::{AuthTable, Projects, Role, token_hash};
use proptest::prelude::*;

/// Longest refusal accepted: names and values are quoted cut short.
const MAX_MESSAGE_BYTES: usize = 1024;

fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 256;
    }
    config.failure_persistence = None;
    config
}

/// Checks a refusal: one line without control characters, short, naming a
/// token or project entry or a line of the file.
fn check(message: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !message.contains(char::is_control),
        "not one clean line: {:?}",
        message
    );
    prop_assert!(
        message.len() < MAX_MESSAGE_BYTES,
        "{} bytes: {:.300}",
        message.len(),
        message
    );
    prop_assert!(
        message.starts_with("token") || message.starts_with("project") || message.contains("line "),
        "names no entry and no line: {}",
        message
    );
    Ok(())
}

/// Table headers of the format, and wrong ones.
fn header() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "[[token]]",
        "[[project]]",
        "[token]",
        "[[project.x]]",
        "[other]",
        "[[token]",
        "[\"\\u001b[2J\"]",
    ])
    .prop_map(str::to_string)
}

/// Keys of the format, and misspelt, quoted or odd ones.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "name",
            "sha256",
            "role",
            "projects",
            "max_queued_tasks",
            "max_running_tasks",
            "max_tasks_per_job",
            "token",
            "project",
        ])
        .prop_map(str::to_string),
        1 => prop::sample::select(vec![
            "color",
            "\"new\\nline\"",
            "\"\\u001b[31m\"",
            "a.b",
            "\"\"",
        ])
        .prop_map(str::to_string),
        1 => (1000usize..4000).prop_map(|n| format!("\"{}\"", "k".repeat(n))),
    ]
}

/// Values of every TOML type, valid and not, short and long.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "\"ops\"",
            "\"studio-a\"",
            "\"a/b\"",
            "\"\"",
            "\"submitter\"",
            "\"viewer\"",
            "\"worker\"",
            "\"admin\"",
            "\"root\"",
            "\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"",
            "\"9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08\"",
            "\"zz\"",
            "\"\\u001b[31m\"",
            "[\"studio-a\"]",
            "[\"*\"]",
            "[\"a\", \"a/b\"]",
            "[]",
            "[1]",
            "5000",
            "-1",
            "0",
            "18446744073709551616",
            "1.5",
            "true",
            "{ name = \"x\" }",
            "1979-05-27",
        ])
        .prop_map(str::to_string),
        1 => (1000usize..4000).prop_map(|n| format!("\"{}\"", "v".repeat(n))),
        1 => (1000usize..4000).prop_map(|n| format!("[\"{}\"]", "p".repeat(n))),
        1 => "[ -~]{0,12}",
    ]
}

/// One line: a header, `key = value`, or a few arbitrary characters.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => header(),
        8 => (key(), value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => any::<String>().prop_map(|s| s.chars().take(16).collect()),
    ]
}

/// A file of lines, often starting as a well-formed token entry.
fn file_text() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(line(), 0..14)).prop_map(|(valid_start, lines)| {
        let start = if valid_start {
            "[[token]]\nname = \"ops\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nrole = \"admin\"\n"
        } else {
            ""
        };
        format!("{start}{}\n", lines.join("\n"))
    })
}

/// A well-formed token: its secret, role and projects (none for workers and admins).
fn token() -> impl Strategy<Value = (String, Role, Vec<String>)> {
    let role = prop::sample::select(vec![
        Role::Submitter,
        Role::Viewer,
        Role::Worker,
        Role::Admin,
    ]);
    (
        "[a-zA-Z0-9]{8,40}",
        role,
        prop::collection::vec("[a-z][a-z0-9-]{0,10}", 1..3),
    )
        .prop_map(|(secret, role, projects)| {
            let projects = if role.needs_projects() {
                projects
            } else {
                Vec::new()
            };
            (secret, role, projects)
        })
}

proptest! {
    #![proptest_config(config())]

    /// Any file parses or is refused with one short line naming its place.
    #[test]
    fn auth_file_never_panics_and_errors_name_their_place(text in file_text()) {
        if let Err(message) = AuthTable::parse(&text) {
            check(&message)?;
        }
    }

    /// Bytes that are not meant as TOML at all are refused the same way.
    #[test]
    fn auth_file_of_any_text_is_refused_on_one_line(text in any::<String>()) {
        if let Err(message) = AuthTable::parse(&text) {
            check(&message)?;
        }
    }

    /// A file listing distinct tokens finds each by its hash, with its role
    /// and projects, and nothing else.
    #[test]
    fn auth_file_finds_every_token_it_lists(
        tokens in prop::collection::vec(token(), 1..6),
    ) {
        let mut tokens = tokens;
        tokens.sort_by(|a, b| a.0.cmp(&b.0));
        tokens.dedup_by(|a, b| a.0 == b.0);
        let mut text = String::new();
        for (i, (secret, role, projects)) in tokens.iter().enumerate() {
            let hash = kiln_domain::image::sha256_hex(secret.as_bytes());
            text += &format!("[[token]]\nname = \"t{i}\"\nsha256 = \"{hash}\"\nrole = \"{role}\"\n");
            if !projects.is_empty() {
                text += &format!("projects = {projects:?}\n");
            }
        }
        let table = AuthTable::parse(&text).map_err(TestCaseError::fail)?;
        prop_assert_eq!(table.len(), tokens.len());
        for (i, (secret, role, projects)) in tokens.iter().enumerate() {
            let caller = table.caller(&token_hash(secret));
            let caller = caller.ok_or_else(|| TestCaseError::fail(format!("t{i} not found")))?;
            prop_assert_eq!(caller.name, format!("t{i}"));
            prop_assert_eq!(caller.role, *role);
            let expected = if projects.is_empty() {
                Projects::All
            } else {
                Projects::Only(projects.iter().cloned().collect())
            };
            prop_assert_eq!(caller.projects, expected);
        }
        prop_assert!(table.caller(&token_hash("not-a-listed-token")).is_none());
    }
}

/// toml's own error text shows the whole source line and the key raw: a
/// terminal escape in a quoted key reached the log, and a long line made a
/// refusal as long as the file.
#[test]
fn regression_toml_errors_are_one_short_clean_line_with_their_line() {
    let message = AuthTable::parse("# x\n[\"\\u001b[2J\"]\n").unwrap_err();
    assert_eq!(
        message,
        "line 2: unknown field `\\u{1b}[2J`, expected `token` or `project`"
    );
    let long = format!("[[token]]\nname = \"{}\" oops\n", "x".repeat(100_000));
    let message = AuthTable::parse(&long).unwrap_err();
    assert!(message.starts_with("line 2: "), "{message:.300}");
    assert!(message.len() < MAX_MESSAGE_BYTES, "{}", message.len());
    let key = format!("[[token]]\n\"{}\" = 1\n", "k".repeat(100_000));
    let message = AuthTable::parse(&key).unwrap_err();
    assert!(
        message.starts_with("line 2: unknown field `kkk"),
        "{message:.300}"
    );
    assert!(message.len() < MAX_MESSAGE_BYTES, "{}", message.len());
}

/// An unknown role was quoted whole: a 100 KB role, a 100 KB refusal.
#[test]
fn regression_an_unknown_role_is_quoted_short() {
    let text = format!(
        "[[token]]\nname = \"ops\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\nrole = \"{}\"\n",
        "r".repeat(100_000)
    );
    let message = AuthTable::parse(&text).unwrap_err();
    assert!(
        message.starts_with("token \"ops\": unknown role \"rrr"),
        "{message:.300}"
    );
    assert!(message.contains("(100000 bytes)"), "{message:.300}");
    assert!(message.len() < MAX_MESSAGE_BYTES, "{}", message.len());
}
