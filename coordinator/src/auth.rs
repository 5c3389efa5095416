//! Who is calling, and what they may do.
//!
//! `--auth FILE` names a TOML table of tokens (stored as the sha256 of each
//! token, never the token) and project limits. [`Authenticate`], the one
//! interceptor in front of both services, turns the `authorization: Bearer
//! TOKEN` header into a [`Caller`] and puts it in the request's extensions;
//! the handlers pass `&Caller` down. [`Caller::require`] decides what a role
//! may do, and [`Caller::job_access`] is the one place where project scoping
//! is decided: a job of a project the caller may not see is answered exactly
//! like a job that does not exist. Without `--auth` every caller is an
//! implicit admin, as before tokens existed.
//!
//! The table is read at start and again on SIGHUP ([`Auth::reload`]); a
//! reload that fails keeps the table in force. Token names, never tokens,
//! appear in logs and audit lines (target `kiln::audit`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use kiln_proto::error::{one_line, quote};
use kiln_proto::ids::{JobId, WorkerId};
use kiln_proto::recipe::check_model_name;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::{CoordinatorError, CoordinatorResult};
use crate::store::{JobRecord, RunningCaps, StoreError};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Submits to its projects, reads, watches, fetches, verifies, cancels,
    /// retries, pauses and reprioritizes their jobs.
    Submitter,
    /// The reads of a submitter, nothing that changes state.
    Viewer,
    /// `WorkerLink` only (and `ListWorkers`).
    Worker,
    /// Everything.
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "submitter" => Self::Submitter,
            "viewer" => Self::Viewer,
            "worker" => Self::Worker,
            "admin" => Self::Admin,
            _ => return None,
        })
    }

    /// The role as written in the auth file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitter => "submitter",
            Self::Viewer => "viewer",
            Self::Worker => "worker",
            Self::Admin => "admin",
        }
    }

    /// Whether tokens of this role are scoped to projects.
    pub fn needs_projects(self) -> bool {
        matches!(self, Self::Submitter | Self::Viewer)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call does, as far as permissions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Submit a job.
    Submit,
    /// Read, watch or fetch a job, or list jobs.
    Read,
    /// Cancel a job.
    Cancel,
    /// Start a verification of a job.
    Verify,
    /// Put a job's failed tasks back in the queue (`kiln retry`).
    Retry,
    /// Pause or resume a job.
    Pause,
    /// Change a job's priority.
    Reorder,
    /// Drain a worker.
    Drain,
    /// List the workers or the models.
    ListWorkers,
    /// Any call of the `WorkerLink` service.
    WorkerLink,
}

impl Action {
    /// The action's name in refusals and audit lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Read => "read",
            Self::Cancel => "cancel",
            Self::Verify => "verify",
            Self::Retry => "retry",
            Self::Pause => "pause",
            Self::Reorder => "reorder",
            Self::Drain => "drain",
            Self::ListWorkers => "list workers",
            Self::WorkerLink => "call WorkerLink",
        }
    }

    /// Whether `role` may take this action at all (projects aside).
    fn allowed_for(self, role: Role) -> bool {
        match role {
            Role::Admin => true,
            Role::Submitter => matches!(
                self,
                Self::Submit
                    | Self::Read
                    | Self::Cancel
                    | Self::Verify
                    | Self::Retry
                    | Self::Pause
                    | Self::Reorder
                    | Self::ListWorkers
            ),
            Role::Viewer => matches!(self, Self::Read | Self::ListWorkers),
            Role::Worker => matches!(self, Self::WorkerLink | Self::ListWorkers),
        }
    }

    /// Whether an admin taking this action leaves an audit line.
    fn audited(self) -> bool {
        matches!(
            self,
            Self::Cancel | Self::Verify | Self::Retry | Self::Pause | Self::Reorder | Self::Drain
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The projects a token reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Projects {
    /// Every project (`"*"`, and every admin or worker).
    All,
    /// These projects only.
    Only(BTreeSet<String>),
}

/// Who is calling: a token's name, role and projects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's name from the auth file (never the token).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Which projects' jobs it reaches.
    pub projects: Projects,
    /// False for the implicit admin of a coordinator without `--auth`.
    pub authenticated: bool,
}

impl Caller {
    /// The caller of every request to a coordinator without `--auth`.
    pub fn implicit_admin() -> Self {
        Self {
            name: "(no --auth)".to_string(),
            role: Role::Admin,
            projects: Projects::All,
            authenticated: false,
        }
    }

    /// Returns the name a worker session opened by this caller is bound
    /// to: the token's name, or `None` without `--auth` (binding off).
    pub fn principal(&self) -> Option<&str> {
        self.authenticated.then_some(self.name.as_str())
    }

    /// Returns whether this caller reaches jobs of `project`.
    pub fn may_see(&self, project: &str) -> bool {
        match &self.projects {
            Projects::All => true,
            Projects::Only(set) => set.contains(project),
        }
    }

    /// The project a job that names none goes to: the caller's only project.
    pub fn default_project(&self) -> Option<&str> {
        match &self.projects {
            Projects::Only(set) if set.len() == 1 => set.iter().next().map(String::as_str),
            _ => None,
        }
    }

    /// Checks that the role allows `action` at all.
    ///
    /// # Errors
    /// `PermissionDenied` naming the token and the action.
    pub fn require(&self, action: Action) -> CoordinatorResult<()> {
        if action.allowed_for(self.role) {
            Ok(())
        } else {
            Err(self.denied(action.as_str()))
        }
    }

    /// The one decision on a job: the role must allow `action`, and the
    /// caller must reach the job's project. A job out of reach is answered
    /// as `NOT_FOUND` with the words of a missing job, so its existence does
    /// not leak. An admin's cancel, verify, retry, pause or priority change
    /// leaves an audit line.
    ///
    /// # Errors
    /// `PermissionDenied` for the role, `JobNotFound` for the project.
    pub fn job_access(&self, job: &JobRecord, action: Action) -> CoordinatorResult<()> {
        self.require(action)?;
        if !self.may_see(&job.project) {
            return Err(StoreError::JobNotFound(job.id).into());
        }
        if self.authenticated && self.role == Role::Admin && action.audited() {
            audit_job(&self.name, action, job.id, &job.project);
        }
        Ok(())
    }

    /// Checks that the caller may act on workers with `action` (drain),
    /// leaving an audit line for an authenticated admin.
    ///
    /// # Errors
    /// `PermissionDenied` when the role does not allow it.
    pub fn worker_access(&self, worker: &WorkerId, action: Action) -> CoordinatorResult<()> {
        self.require(action)?;
        if self.authenticated && action.audited() {
            tracing::info!(target: "kiln::audit", token = %self.name, action = %action, worker = %worker, "admin action");
        }
        Ok(())
    }

    /// Checks that the caller may submit to `project`.
    ///
    /// # Errors
    /// `PermissionDenied` naming the project.
    pub fn may_submit_to(&self, project: &str) -> CoordinatorResult<()> {
        self.require(Action::Submit)?;
        if self.may_see(project) {
            Ok(())
        } else {
            Err(self.denied(&format!("submit to project {project:?}")))
        }
    }

    fn denied(&self, action: &str) -> CoordinatorError {
        CoordinatorError::PermissionDenied {
            caller: format!("{} ({})", self.name, self.role),
            action: action.to_string(),
        }
    }
}

fn audit_job(name: &str, action: Action, job: JobId, project: &str) {
    tracing::info!(target: "kiln::audit", token = %name, action = %action, job = %job, project = %project, "admin action");
}

/// The limits of one project (`[[project]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectLimits {
    /// The project.
    pub name: String,
    /// Most tasks the project may have queued or running at once.
    pub max_queued_tasks: Option<u64>,
    /// Most tasks of the project leased at once (enforced by the store at each claim).
    pub max_running_tasks: Option<u64>,
    /// Most tasks in one job.
    pub max_tasks_per_job: Option<u64>,
}

/// One token of the table.
#[derive(Clone, Debug)]
struct Token {
    hash: [u8; 32],
    caller: Caller,
}

/// The tokens and project limits of an auth file.
#[derive(Clone, Debug, Default)]
pub struct AuthTable {
    tokens: Vec<Token>,
    projects: BTreeMap<String, ProjectLimits>,
}

/// Why an auth file was refused: one line naming the file and the entry.
#[derive(Debug, thiserror::Error)]
#[error("--auth {file}: {message}")]
pub struct AuthFileError {
    /// The file.
    pub file: String,
    /// What is wrong, naming the entry.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    project: Vec<ProjectLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    role: String,
    #[serde(default)]
    projects: Vec<String>,
}

/// Returns the sha256 of a token, as stored in the auth file.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two hashes in constant time.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    bool::from(a.ct_eq(b))
}

impl AuthTable {
    /// Parses the text of an auth file.
    ///
    /// # Errors
    /// A message naming the entry: TOML errors, unknown keys, unknown roles,
    /// a hash that is not 64 hex digits, a submitter or viewer without
    /// projects, invalid or repeated names.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: FileFormat = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let mut table = Self::default();
        let mut names = BTreeSet::new();
        for (i, entry) in file.token.iter().enumerate() {
            let at = format!("token[{i}]");
            check_model_name(&format!("{at}.name"), &entry.name).map_err(|e| e.to_string())?;
            let at = format!("token {:?}", entry.name);
            if !names.insert(entry.name.clone()) {
                return Err(format!("{at}: the name is used twice"));
            }
            let hash = parse_hash(&entry.sha256)
                .ok_or_else(|| format!("{at}: sha256 must be 64 hex digits (the sha256 of the token, as `kiln token new` prints it)"))?;
            if table.tokens.iter().any(|t| hashes_equal(&t.hash, &hash)) {
                return Err(format!("{at}: the same sha256 as another token"));
            }
            let role = Role::parse(&entry.role).ok_or_else(|| {
                format!(
                    "{at}: unknown role {}: use submitter, viewer, worker or admin",
                    quote(&entry.role)
                )
            })?;
            let projects = if role.needs_projects() {
                if entry.projects.is_empty() {
                    return Err(format!(
                        "{at}: a {role} needs projects = [\"NAME\", ...] (\"*\" for every project)"
                    ));
                }
                if entry.projects.iter().any(|p| p == "*") {
                    Projects::All
                } else {
                    for (j, p) in entry.projects.iter().enumerate() {
                        check_model_name(&format!("{at}: projects[{j}]"), p)
                            .map_err(|e| e.to_string())?;
                    }
                    Projects::Only(entry.projects.iter().cloned().collect())
                }
            } else {
                if !entry.projects.is_empty() {
                    return Err(format!(
                        "{at}: a {role} reaches every project; projects are for submitter and viewer tokens"
                    ));
                }
                Projects::All
            };
            table.tokens.push(Token {
                hash,
                caller: Caller {
                    name: entry.name.clone(),
                    role,
                    projects,
                    authenticated: true,
                },
            });
        }
        for (i, project) in file.project.into_iter().enumerate() {
            check_model_name(&format!("project[{i}].name"), &project.name)
                .map_err(|e| e.to_string())?;
            if table.projects.contains_key(&project.name) {
                return Err(format!("project {:?}: listed twice", project.name));
            }
            table.projects.insert(project.name.clone(), project);
        }
        Ok(table)
    }

    /// Reads and parses an auth file.
    ///
    /// # Errors
    /// When the file cannot be read or is refused by [`AuthTable::parse`].
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let error = |message: String| AuthFileError {
            file: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
        Self::parse(&text).map_err(error)
    }

    /// Returns the caller whose token hashes to `hash`. Every entry is
    /// compared, in constant time, whatever matches.
    pub fn caller(&self, hash: &[u8; 32]) -> Option<Caller> {
        let mut found = None;
        for token in &self.tokens {
            if hashes_equal(&token.hash, hash) {
                found = Some(&token.caller);
            }
        }
        found.cloned()
    }

    /// Returns the number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Returns true when the table holds no token.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

/// Most characters of a TOML error kept: the message quotes the key it is
/// about, which may be as long as the file.
const MAX_TOML_ERROR_CHARS: usize = 300;

/// Returns a TOML or format error as one line naming the line of the file:
/// not the source line toml's own text shows, which may be as long as the
/// file, and control characters of a key escaped.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let message = one_line(&message, Some(MAX_TOML_ERROR_CHARS));
    match e.span() {
        Some(span) => {
            let line = text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// Why a request carries no usable token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` header.
    #[error("no token: send `authorization: Bearer TOKEN` (KILN_TOKEN or --token-file)")]
    Missing,
    /// A header that is not `Bearer TOKEN`.
    #[error("the authorization header is not `Bearer TOKEN`")]
    Malformed,
    /// A token the coordinator does not know.
    #[error("unknown token: the coordinator's --auth file has no token with this sha256")]
    Unknown,
}

/// The coordinator's authentication: off, or a table read from a file.
#[derive(Debug, Default)]
pub struct Auth {
    file: Option<PathBuf>,
    table: RwLock<Arc<AuthTable>>,
}

impl Auth {
    /// No authentication: every caller is an implicit admin.
    pub fn off() -> Self {
        Self::default()
    }

    /// Reads the table from `file`.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn open(file: &Path) -> Result<Self, AuthFileError> {
        let table = AuthTable::load(file)?;
        Ok(Self {
            file: Some(file.to_path_buf()),
            table: RwLock::new(Arc::new(table)),
        })
    }

    /// Returns a table given in memory.
    #[cfg(test)]
    fn with_table(table: AuthTable) -> Self {
        Self {
            file: Some(PathBuf::new()),
            table: RwLock::new(Arc::new(table)),
        }
    }

    /// Returns true when requests need a token.
    pub fn is_on(&self) -> bool {
        self.file.is_some()
    }

    fn table(&self) -> Arc<AuthTable> {
        match self.table.read() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the file again; on failure keeps the table in force and logs
    /// one line. Returns whether the new table is in force.
    pub fn reload(&self) -> bool {
        let Some(file) = self.file.as_deref() else {
            return false;
        };
        match AuthTable::load(file) {
            Ok(table) => {
                let tokens = table.len();
                let projects = table.projects.len();
                match self.table.write() {
                    Ok(mut t) => *t = Arc::new(table),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(table),
                }
                tracing::info!(file = %file.display(), tokens, projects, "auth file reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "auth file reload failed; the previous tokens stay in force");
                false
            }
        }
    }

    /// Returns the limits of `project`, if the file sets any.
    pub fn limits(&self, project: &str) -> Option<ProjectLimits> {
        self.table().projects.get(project).cloned()
    }

    /// Returns every project's `max_running_tasks` in the table in force.
    pub fn running_caps(&self) -> RunningCaps {
        self.table()
            .projects
            .values()
            .filter_map(|p| Some((p.name.clone(), p.max_running_tasks?)))
            .collect()
    }

    /// Turns a request's metadata into its caller.
    ///
    /// # Errors
    /// Without `--auth` never; with it, a missing, malformed or unknown token.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        if !self.is_on() {
            return Ok(Caller::implicit_admin());
        }
        let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        self.caller_of_token(token)
    }

    /// Returns the caller a token stands for (the dashboard's session
    /// cookie carries one); the implicit admin without `--auth`.
    ///
    /// # Errors
    /// With `--auth`, a token the table does not know.
    pub fn caller_of_token(&self, token: &str) -> Result<Caller, AuthError> {
        if !self.is_on() {
            return Ok(Caller::implicit_admin());
        }
        self.table()
            .caller(&token_hash(token))
            .ok_or(AuthError::Unknown)
    }
}

/// Which service an [`Authenticate`] interceptor guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// `kiln.v1.Farm`: each handler checks its own action.
    Farm,
    /// `kiln.v1.WorkerLink`: workers and admins only, checked here.
    WorkerLink,
}

/// The interceptor in front of both services: authenticates every request
/// and puts its [`Caller`] in the request's extensions.
#[derive(Clone, Debug)]
pub struct Authenticate {
    auth: Arc<Auth>,
    service: Service,
}

impl Authenticate {
    /// Returns the interceptor of `service`.
    pub fn new(auth: Arc<Auth>, service: Service) -> Self {
        Self { auth, service }
    }
}

impl Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self
            .auth
            .authenticate(request.metadata())
            .map_err(|e| Status::from(CoordinatorError::Unauthenticated(e)))?;
        if self.service == Service::WorkerLink {
            caller.require(Action::WorkerLink).map_err(Status::from)?;
        }
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Returns the caller the interceptor put in `request`.
///
/// # Errors
/// `Unauthenticated` when the request did not pass the interceptor.
pub fn caller_of<T>(request: &Request<T>) -> CoordinatorResult<Caller> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(CoordinatorError::Unauthenticated(AuthError::Missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn entry(role: &str, projects: &str) -> String {
        format!(
            "[[token]]\nname = \"t\"\nsha256 = \"{HASH}\"\nrole = \"{role}\"\nprojects = {projects}\n"
        )
    }

    fn caller(role: Role, projects: &[&str]) -> Caller {
        Caller {
            name: "t".into(),
            role,
            projects: Projects::Only(projects.iter().map(|p| p.to_string()).collect()),
            authenticated: true,
        }
    }

    fn job(project: &str) -> JobRecord {
        JobRecord {
            id: JobId::new(),
            name: "j".into(),
            project: project.into(),
            priority: 0,
            state: crate::store::JobState::Running,
            counts: Default::default(),
            created_at_ms: 0,
            finished_at_ms: None,
            idempotency_key: None,
            class: None,
            verify_of: None,
            paused: false,
            traceparent: None,
            submitted_by: None,
        }
    }

    #[test]
    fn a_valid_file_parses_and_finds_its_token() {
        let text = format!(
            "{}\n[[project]]\nname = \"studio-a\"\nmax_queued_tasks = 5\nmax_running_tasks = 2\nmax_tasks_per_job = 3\n",
            entry("submitter", "[\"studio-a\"]")
        );
        let table = AuthTable::parse(&text).unwrap();
        let found = table.caller(&token_hash("test")).unwrap();
        assert_eq!(found.role, Role::Submitter);
        assert_eq!(found.default_project(), Some("studio-a"));
        assert!(table.caller(&token_hash("other")).is_none());
        assert_eq!(table.projects["studio-a"].max_queued_tasks, Some(5));
    }

    #[test]
    fn caps_and_principals_come_from_the_table_in_force() {
        let text = format!(
            "{}\n[[project]]\nname = \"capped\"\nmax_running_tasks = 2\n\n[[project]]\nname = \"open\"\nmax_queued_tasks = 9\n",
            entry("worker", "[]")
        );
        let auth = Auth::with_table(AuthTable::parse(&text).unwrap());
        assert_eq!(
            auth.running_caps(),
            RunningCaps::from([("capped".to_string(), 2)]),
            "a project without max_running_tasks has no cap"
        );
        assert!(Auth::off().running_caps().is_empty());
        let worker = AuthTable::parse(&text)
            .unwrap()
            .caller(&token_hash("test"))
            .unwrap();
        assert_eq!(worker.principal(), Some("t"));
        assert_eq!(
            Caller::implicit_admin().principal(),
            None,
            "no --auth: no binding"
        );
    }

    #[test]
    fn unknown_roles_keys_bad_hex_and_missing_projects_are_refused() {
        let text = AuthTable::parse(&entry("root", "[\"a\"]")).unwrap_err();
        assert!(text.contains("unknown role \"root\""), "{text}");
        let text = AuthTable::parse(&entry("submitter", "[]")).unwrap_err();
        assert!(text.contains("needs projects"), "{text}");
        let text = AuthTable::parse(&entry("viewer", "[]")).unwrap_err();
        assert!(text.contains("needs projects"), "{text}");
        let text = AuthTable::parse(&entry("worker", "[\"a\"]")).unwrap_err();
        assert!(text.contains("projects are for"), "{text}");
        let bad = entry("admin", "[]").replace(HASH, "zz");
        let text = AuthTable::parse(&bad).unwrap_err();
        assert!(text.contains("64 hex digits"), "{text}");
        let text = AuthTable::parse(&format!("{}color = 1\n", entry("admin", "[]"))).unwrap_err();
        assert!(text.contains("color"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        let text = AuthTable::parse("[[project]]\nname = \"p\"\nmax_gpus = 1\n").unwrap_err();
        assert!(text.contains("max_gpus"), "{text}");
        let text = AuthTable::parse("[[project]]\nname = \"a/b\"\n").unwrap_err();
        assert!(text.contains("project[0].name"), "{text}");
    }

    #[test]
    fn hashes_compare_in_constant_time_and_exactly() {
        let a = token_hash("a");
        let mut b = a;
        assert!(hashes_equal(&a, &b));
        b[31] ^= 1;
        assert!(!hashes_equal(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!hashes_equal(&a, &b));
    }

    #[test]
    fn roles_decide_actions() {
        let submitter = caller(Role::Submitter, &["a"]);
        let viewer = caller(Role::Viewer, &["a"]);
        let worker = Caller {
            projects: Projects::All,
            ..caller(Role::Worker, &[])
        };
        for action in [
            Action::Submit,
            Action::Read,
            Action::Cancel,
            Action::Verify,
            Action::Retry,
            Action::Pause,
            Action::Reorder,
        ] {
            assert!(submitter.require(action).is_ok(), "{action}");
        }
        assert!(submitter.require(Action::Drain).is_err());
        assert!(submitter.require(Action::WorkerLink).is_err());
        assert!(viewer.require(Action::Read).is_ok());
        for action in [
            Action::Submit,
            Action::Cancel,
            Action::Verify,
            Action::Retry,
            Action::Pause,
            Action::Reorder,
            Action::Drain,
        ] {
            let e = viewer.require(action).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{action}");
        }
        assert!(worker.require(Action::WorkerLink).is_ok());
        assert!(worker.require(Action::ListWorkers).is_ok());
        assert!(worker.require(Action::Read).is_err());
        assert!(worker.require(Action::Submit).is_err());
        assert!(Caller::implicit_admin().require(Action::Drain).is_ok());
    }

    #[test]
    fn a_job_of_another_project_is_not_found_like_a_missing_one() {
        let submitter = caller(Role::Submitter, &["a"]);
        let theirs = job("b");
        let e = submitter.job_access(&theirs, Action::Read).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert_eq!(
            e.to_string(),
            CoordinatorError::from(StoreError::JobNotFound(theirs.id)).to_string()
        );
        assert!(submitter.job_access(&job("a"), Action::Cancel).is_ok());
        assert!(submitter.may_submit_to("a").is_ok());
        assert_eq!(
            submitter.may_submit_to("b").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let everywhere = Caller {
            projects: Projects::All,
            ..submitter
        };
        assert!(everywhere.job_access(&theirs, Action::Read).is_ok());
        assert_eq!(everywhere.default_project(), None);
    }

    #[test]
    fn the_header_is_read_and_unknown_or_missing_tokens_are_refused() {
        let table = AuthTable::parse(&entry("admin", "[]")).unwrap();
        let auth = Auth::with_table(table);
        let mut md = MetadataMap::new();
        assert_eq!(auth.authenticate(&md), Err(AuthError::Missing));
        md.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(auth.authenticate(&md), Err(AuthError::Unknown));
        md.insert("authorization", "Basic test".parse().unwrap());
        assert_eq!(auth.authenticate(&md), Err(AuthError::Malformed));
        md.insert("authorization", "Bearer test".parse().unwrap());
        assert_eq!(auth.authenticate(&md).unwrap().role, Role::Admin);
        assert_eq!(
            Auth::off().authenticate(&MetadataMap::new()).unwrap(),
            Caller::implicit_admin()
        );
    }
}
