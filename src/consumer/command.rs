//! A command that restarts the workload, such as `docker compose up -d --force-recreate proxy`.

use std::process::Stdio;

use async_trait::async_trait;
use std::time::Duration;

use super::{Consumer, ConsumerError};

pub struct CommandConsumer {
    argv: Vec<String>,
}

impl CommandConsumer {
    pub fn new(argv: Vec<String>) -> Self {
        CommandConsumer { argv }
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
        // The command's output goes to our stderr so it never mixes into a JSON report on stdout.
        let mut child = tokio::process::Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::from(std::io::stderr()))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| error(format!("cannot start {:?}: {e}", self.argv[0])))?;
        match tokio::time::timeout(timeout, child.wait()).await {
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
