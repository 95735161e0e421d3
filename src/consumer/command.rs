//! A command that restarts the workload, such as `docker compose up -d --force-recreate proxy`.

use std::process::Stdio;

use async_trait::async_trait;
use std::time::Duration;

use super::{Consumer, ConsumerError, ConsumerSettings};
use crate::config::{At, Errors, Validate};

/// `kind = "command"`: a program run with a cleared environment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct CommandConfig {
    /// The program and its arguments.
    pub command: Option<Vec<String>>,
    /// Names passed through besides [`BASE_ENV`] (the rest is cleared).
    #[serde(default)]
    pub env: Vec<String>,
}

impl Validate for CommandConfig {
    fn validate(&mut self, at: &At, errors: &mut Errors) {
        match &self.command {
            Some(argv) if argv.is_empty() => errors.push(
                at.of("command"),
                "must name a program: [\"program\", \"arg\", ...]",
            ),
            Some(_) => {}
            None => errors.missing(at.of("command"), "is required for kind = \"command\""),
        }
        for (i, name) in self.env.iter().enumerate() {
            let mut chars = name.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                errors.push(
                    format!("{}[{i}]", at.of("env")),
                    format!("{name:?} is not a variable name (letters, digits and _)"),
                );
            }
        }
    }
}

impl ConsumerSettings for CommandConfig {
    fn uses_kubernetes(&self) -> bool {
        false
    }

    fn open(&self, _kube: Option<&kube::Client>) -> Option<Box<dyn Consumer>> {
        Some(Box::new(CommandConsumer::new(
            self.command.clone().unwrap_or_default(),
            self.env.clone(),
        )))
    }
}

/// Variables every command gets when set: enough to find programs and speak the locale.
pub const BASE_ENV: [&str; 4] = ["PATH", "HOME", "LANG", "TZ"];

pub struct CommandConsumer {
    argv: Vec<String>,
    /// Names passed through from our environment besides [`BASE_ENV`].
    env: Vec<String>,
}

impl CommandConsumer {
    pub fn new(argv: Vec<String>, env: Vec<String>) -> Self {
        CommandConsumer { argv, env }
    }

    /// Only allowed names: our environment holds the journal key and often admin passwords.
    fn allowed_env(&self) -> Vec<(String, std::ffi::OsString)> {
        BASE_ENV
            .iter()
            .copied()
            .chain(self.env.iter().map(String::as_str))
            .filter_map(|name| std::env::var_os(name).map(|value| (name.to_string(), value)))
            .collect()
    }
}

/// Kills the command's whole process group when dropped before the command exited (timed out,
/// or the run was cancelled), so nothing it started keeps running on a step that is over.
/// A command that exited is left alone: what it started in the background may be the workload.
struct GroupKiller(Option<rustix::process::Pid>);

impl GroupKiller {
    fn new(pid: u32) -> Self {
        GroupKiller(
            i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw),
        )
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            // ESRCH (the group is gone already) is the usual, harmless answer.
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

#[async_trait]
impl Consumer for CommandConsumer {
    fn describe(&self) -> String {
        format!("command {}", self.argv[0])
    }

    async fn restart(&self, timeout: Duration) -> Result<(), ConsumerError> {
        let error = |message: String| ConsumerError::Command {
            consumer: self.describe(),
            message,
        };
        // A cleared environment plus the allow-list, so no secret of ours leaks into it.
        // Its output goes to our stderr so it never mixes into a JSON report on stdout.
        // Its own process group lets a timeout or a cancelled run stop it and all it started.
        let mut child = tokio::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .env_clear()
            .envs(self.allowed_env())
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::from(std::io::stderr()))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| error(format!("cannot start {:?}: {e}", self.argv[0])))?;
        let mut group = child.id().map(GroupKiller::new);
        let waited = tokio::time::timeout(timeout, child.wait()).await;
        if waited.is_ok() {
            group.as_mut().map(GroupKiller::disarm);
        }
        match waited {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(error(format!("exited with {status}"))),
            Ok(Err(e)) => Err(error(format!("cannot wait for it: {e}"))),
            Err(_) => Err(ConsumerError::Timeout {
                consumer: self.describe(),
                timeout,
                waiting_for: "the command to exit (it was killed)".into(),
            }),
        }
    }
}
