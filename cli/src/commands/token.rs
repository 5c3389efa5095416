//! `kiln token new`: makes a token for a coordinator's `--auth` file.
//!
//! The token is 32 bytes of OS randomness in hex behind a `kiln_` prefix; the
//! auth file keeps only its sha256, so the token is printed once, here.

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// Tokens for a coordinator started with `--auth FILE`.
#[derive(clap::Args, Debug)]
pub struct Token {
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    New(New),
}

/// Make a new token: prints it alone on the first line, then the `[[token]]`
/// block to paste into the coordinator's --auth file (which stores only its sha256).
#[derive(clap::Args, Debug)]
pub struct New {
    /// The token's name, shown in logs and audit lines.
    #[arg(long)]
    name: String,
    /// submitter, viewer, worker or admin.
    #[arg(long)]
    role: String,
    /// A project the token reaches (repeat; `*` for every project); submitter
    /// and viewer tokens need at least one.
    #[arg(long = "project", value_name = "P")]
    projects: Vec<String>,
    /// Print `{"token": ..., "block": ...}`.
    #[arg(long)]
    json: bool,
}

impl Token {
    /// Runs `kiln token`.
    pub fn run(self) -> anyhow::Result<bool> {
        match self.command {
            TokenCommand::New(new) => new.run().map(|()| true),
        }
    }
}

impl New {
    fn run(self) -> anyhow::Result<()> {
        kiln_proto::recipe::check_model_name("--name", &self.name)?;
        let scoped = match self.role.as_str() {
            "submitter" | "viewer" => true,
            "worker" | "admin" => false,
            other => {
                bail!("--role: unknown role {other:?}: use submitter, viewer, worker or admin")
            }
        };
        if scoped && self.projects.is_empty() {
            bail!(
                "--project: a {} token needs at least one project (`*` for every project)",
                self.role
            );
        }
        if !scoped && !self.projects.is_empty() {
            bail!(
                "--project: a {} token reaches every project; --project is for submitter and viewer tokens",
                self.role
            );
        }
        for p in self.projects.iter().filter(|p| *p != "*") {
            kiln_proto::recipe::check_model_name("--project", p)?;
        }
        let token = new_token()?;
        let block = block(&self.name, &self.role, &self.projects, &token);
        if self.json {
            println!("{}", serde_json::json!({ "token": token, "block": block }));
        } else {
            println!("{token}");
            print!("{block}");
        }
        Ok(())
    }
}

/// Returns a new token: `kiln_` and 32 random bytes from the OS, in hex.
fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).context("cannot read randomness from the operating system")?;
    Ok(format!("kiln_{}", hex::encode(bytes)))
}

/// The `[[token]]` block of the auth file for `token`.
fn block(name: &str, role: &str, projects: &[String], token: &str) -> String {
    let sha256 = hex::encode(Sha256::digest(token.as_bytes()));
    let mut text = format!(
        "[[token]]\nname = {}\nsha256 = \"{sha256}\"\nrole = \"{role}\"\n",
        toml_string(name)
    );
    if !projects.is_empty() {
        let list: Vec<String> = projects.iter().map(|p| toml_string(p)).collect();
        text.push_str(&format!("projects = [{}]\n", list.join(", ")));
    }
    text
}

/// A TOML basic string (the names are checked, so only quotes need care).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("\"{text}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_distinct() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), "kiln_".len() + 64);
    }

    #[test]
    fn the_block_holds_the_hash_not_the_token() {
        let text = block("studio-a", "submitter", &["studio-a".into()], "kiln_abc");
        assert!(!text.contains("kiln_abc"));
        assert!(text.contains(&hex::encode(Sha256::digest(b"kiln_abc"))));
        assert!(text.contains("projects = [\"studio-a\"]"));
    }
}
