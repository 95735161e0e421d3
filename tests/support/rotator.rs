//! Drives the `llmtrace-rotator` binary the way an operator or the CronJob does, and checks
//! its output for leaked secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::config::ConfigBuilder;
use super::kube_fake::{KubeFake, Rollout, WorkloadKind};
use super::postgres::Postgres;

pub const NS: &str = "llmtrace";

/// The rotator binary cargo built for the running test: in the directory above the test
/// executable's `deps/`, where assert_cmd's `cargo_bin` looks too (`CARGO_BIN_EXE_*` is only
/// set when the package's own tests are compiled, not this crate).
pub fn bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("the test executable's path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("llmtrace-rotator{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} is not built", bin.display());
    bin
}

/// A `--output json` report's steps as "step status", in order.
pub fn steps(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s["step"].as_str().unwrap(),
                s["status"].as_str().unwrap()
            )
        })
        .collect()
}

/// The report's failed steps.
pub fn failed_steps(report: &serde_json::Value) -> Vec<&serde_json::Value> {
    let steps = report["steps"].as_array().expect("steps");
    steps.iter().filter(|s| s["status"] == "failed").collect()
}

/// The report's step `name`.
pub fn step<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let steps = report["steps"].as_array().expect("steps");
    let found = steps.iter().find(|s| s["step"] == name);
    found.unwrap_or_else(|| panic!("a {name} step in {report}"))
}

/// A random alphanumeric password, like an operator's initial one.
pub fn random_password() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Every way a secret could be spelled in output: raw, percent-encoded, base64.
fn spellings(secret: &str) -> Vec<String> {
    let mut forms = vec![
        secret.to_string(),
        utf8_percent_encode(secret, NON_ALPHANUMERIC).to_string(),
        base64::engine::general_purpose::STANDARD.encode(secret),
    ];
    forms.dedup();
    forms
}

pub fn assert_no_secret(haystack: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        for form in spellings(secret) {
            assert!(
                !haystack.contains(&form),
                "{what} contains a secret ({} chars, spelled {:?}...)",
                form.len(),
                &form[..4]
            );
        }
    }
}

/// A temp dir with a config file, a journal and the environment the binary runs with.
pub struct Rotator {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub env: BTreeMap<String, String>,
}

impl Rotator {
    pub fn new(config_text: &str) -> Rotator {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rotator.toml");
        std::fs::write(&config, config_text).unwrap();
        let mut env = BTreeMap::new();
        env.insert(
            "ROTATOR_JOURNAL_KEY".into(),
            base64::engine::general_purpose::STANDARD.encode(rand_bytes()),
        );
        env.insert("RUST_LOG".into(), "trace".into());
        Rotator { dir, config, env }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        self.command_with(args, &self.config)
    }

    fn command_with(&self, args: &[&str], config: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(bin());
        command
            .args(args)
            .arg("--config")
            .arg(config)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Starts `llmtrace-rotator <args> --config FILE` with piped output.
    pub fn spawn(&self, args: &[&str]) -> tokio::process::Child {
        self.command(args).spawn().expect("rotator started")
    }

    /// [`Rotator::spawn`] with extra environment variables.
    pub fn spawn_with(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        command.spawn().expect("rotator started")
    }

    /// Runs `llmtrace-rotator <args> --config FILE` to completion.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[]).await
    }

    /// A successful `rotate --output json` and every boundary it crossed, in the order it
    /// crossed them: `step:subject:started` and `step:subject:ok`.
    pub async fn rotate_listing_boundaries(&self) -> (Output, Vec<String>) {
        let out = self
            .run_with(
                &["rotate", "--output", "json"],
                &[("LLMTRACE_ROTATOR_TRACE_BOUNDARIES", "1")],
            )
            .await;
        assert_eq!(out.code, 0, "{}", out.all());
        let all = out
            .stderr
            .lines()
            .filter_map(|line| line.strip_prefix("failpoint boundary: "))
            .map(str::to_string)
            .collect();
        (out, all)
    }

    /// [`Rotator::run`] with extra environment variables.
    pub async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let output = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .expect("rotator finished within 120 s")
            .expect("rotator started");
        Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Starts `llmtrace-rotator <args>` pausing at `boundary` (for `pause_ms`, or for good when
    /// `None`) and returns once it is there. Its stderr keeps being read, into the returned
    /// buffer, so the process never blocks on a full pipe.
    pub async fn pause_at(
        &self,
        args: &[&str],
        boundary: &str,
        pause_ms: Option<u64>,
    ) -> (tokio::process::Child, Arc<Mutex<String>>) {
        let pause = pause_ms.map(|ms| ms.to_string());
        let mut env = vec![("LLMTRACE_ROTATOR_PAUSE_AT", boundary)];
        if let Some(ms) = &pause {
            env.push(("LLMTRACE_ROTATOR_PAUSE_FOR", ms));
        }
        let mut child = self.spawn_with(args, &env);
        let seen = Arc::new(Mutex::new(String::new()));
        let (reached, reached_rx) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = seen.clone();
        tokio::spawn(async move {
            let mut reached = Some(reached);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("failpoint reached: ") {
                    if let Some(reached) = reached.take() {
                        let _ = reached.send(());
                    }
                }
                let mut kept = kept.lock().unwrap();
                kept.push_str(&line);
                kept.push('\n');
            }
        });
        let reached = tokio::time::timeout(Duration::from_secs(60), reached_rx).await;
        let printed = || seen.lock().unwrap().clone();
        match reached {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("{args:?} ended before {boundary}:\n{}", printed()),
            Err(_) => panic!("{args:?} never reached {boundary}:\n{}", printed()),
        }
        (child, seen)
    }

    /// Starts `rotate`, waits until it pauses at `boundary`, and kills it (SIGKILL). Returns
    /// what it printed.
    pub async fn crash_at(&self, boundary: &str) -> String {
        let (mut child, seen) = self.pause_at(&["rotate"], boundary, None).await;
        child.start_kill().unwrap();
        let status = child.wait().await.unwrap();
        assert!(!status.success());
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        format!("{stdout}\n{seen}")
    }
}

fn rand_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(16) {
        chunk.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    }
    bytes
}

/// The LLMTrace Helm chart's shape: the proxy's Secret with connection URLs, the PostgreSQL
/// sub-chart's Secret, the proxy Deployment, and a real PostgreSQL behind them.
pub struct LlmtraceCluster {
    pub pg: Postgres,
    pub kube: KubeFake,
    pub rotator: Rotator,
    pub old_password: String,
    pub redis_url: String,
}

impl LlmtraceCluster {
    pub async fn start(rollout: Rollout) -> LlmtraceCluster {
        let pg = Postgres::start().await;
        let old_password = random_password();
        pg.create_login("llmtrace", &old_password, "llmtrace").await;
        let kube = KubeFake::start().await;
        let redis_url = "redis://:redis-secret-value@llmtrace-redis-master:6379/0".to_string();
        kube.put_secret(
            NS,
            "llmtrace",
            &[
                (
                    "LLMTRACE_POSTGRES_URL",
                    &pg.url("llmtrace", &old_password, "llmtrace"),
                ),
                ("LLMTRACE_REDIS_URL", &redis_url),
                (
                    "LLMTRACE_CLICKHOUSE_URL",
                    "http://default:ch-secret@llmtrace-clickhouse:8123",
                ),
                ("LLMTRACE_CLICKHOUSE_DATABASE", "llmtrace"),
            ],
        );
        kube.put_secret(
            NS,
            "llmtrace-postgresql",
            &[
                ("password", &old_password),
                ("postgres-password", pg.admin_password()),
            ],
        );
        kube.add_deployment(NS, "llmtrace", 2, rollout);
        let rotator = Rotator::new(&kubernetes_config(&pg.address(), "20s", ""));
        let kubeconfig = kube.write_kubeconfig(rotator.dir.path());
        let mut cluster = LlmtraceCluster {
            pg,
            kube,
            rotator,
            old_password,
            redis_url,
        };
        cluster
            .rotator
            .env
            .insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        cluster
    }

    pub fn url(&self) -> String {
        self.kube.secret(NS, "llmtrace").unwrap()["LLMTRACE_POSTGRES_URL"].clone()
    }

    pub fn chart_password(&self) -> String {
        self.kube.secret(NS, "llmtrace-postgresql").unwrap()["password"].clone()
    }

    pub fn restarts(&self) -> usize {
        self.kube
            .restarts(WorkloadKind::Deployment, NS, "llmtrace")
            .len()
    }

    /// The password inside the proxy's URL.
    pub fn url_password(&self) -> String {
        let url = url::Url::parse(&self.url()).unwrap();
        percent_encoding::percent_decode_str(url.password().unwrap())
            .decode_utf8()
            .unwrap()
            .into_owned()
    }

    pub fn secrets_in_play(&self) -> Vec<String> {
        vec![
            self.old_password.clone(),
            self.url_password(),
            self.chart_password(),
            self.pg.admin_password().to_string(),
        ]
    }
}

/// The config for [`LlmtraceCluster`]; `consumer_extra` adds lines to the consumer (e.g. health).
pub fn kubernetes_config(pg_address: &str, timeout: &str, consumer_extra: &str) -> String {
    kubernetes_builder(pg_address, timeout)
        .lines(consumer_extra)
        .build()
}

/// [`kubernetes_config`] as a builder, for tests that change it.
pub fn kubernetes_builder(pg_address: &str, timeout: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .postgres(pg_address)
        .set(
            "admin",
            "{ user = \"postgres\", password = \"k8s:llmtrace/llmtrace-postgresql#postgres-password\" }",
        )
        .kubernetes_store("llmtrace", "LLMTRACE_POSTGRES_URL", "url")
        .kubernetes_store("llmtrace-postgresql", "password", "password")
        .deployment_consumer(timeout)
}

/// The docker-compose shape: a dotenv file and a restart command, with a real PostgreSQL.
pub struct ComposeHost {
    pub pg: Postgres,
    pub rotator: Rotator,
    pub old_password: String,
    pub env_file: PathBuf,
    pub restart_log: PathBuf,
}

pub const ENV_FILE_HEAD: &str = "# LLMTrace proxy\nLLMTRACE_LISTEN_ADDR=0.0.0.0:8080\n";
pub const ENV_FILE_TAIL: &str = "# cache\nLLMTRACE_REDIS_URL=redis://:r3dis@redis:6379/0 # keep\n";

impl ComposeHost {
    pub async fn start() -> ComposeHost {
        Self::start_with_command(None).await
    }

    /// `command`: the consumer's argv; by default it appends a line to `restarts.log`.
    pub async fn start_with_command(command: Option<Vec<String>>) -> ComposeHost {
        let pg = Postgres::start().await;
        let old_password = random_password();
        pg.create_login("llmtrace", &old_password, "llmtrace").await;
        let rotator = Rotator::new("");
        let env_file = rotator.path(".env");
        let restart_log = rotator.path("restarts.log");
        std::fs::write(
            &env_file,
            format!(
                "{ENV_FILE_HEAD}LLMTRACE_POSTGRES_URL=postgres://llmtrace:{old_password}@{}/llmtrace?sslmode=disable\nPGPASSWORD='{old_password}'\n{ENV_FILE_TAIL}",
                pg.address()
            ),
        )
        .unwrap();
        let command = command.unwrap_or_else(|| {
            vec![
                "sh".into(),
                "-c".into(),
                format!("echo restarted >> {}", restart_log.display()),
            ]
        });
        let mut host = ComposeHost {
            pg,
            rotator,
            old_password,
            env_file,
            restart_log,
        };
        host.rotator.env.insert(
            "PG_ADMIN_PASSWORD".into(),
            host.pg.admin_password().to_string(),
        );
        host.rotator
            .write_config(&file_config(&host.pg.address(), &command));
        host
    }

    /// Moves the journal to a database `rotator_journal` on the test PostgreSQL (what several
    /// replicas share); configs written afterwards go through [`postgres_journal`].
    pub async fn use_postgres_journal(&mut self) {
        self.pg.exec("CREATE DATABASE rotator_journal").await;
        let url = self
            .pg
            .url("postgres", self.pg.admin_password(), "rotator_journal");
        self.rotator.env.insert("ROTATOR_JOURNAL_URL".into(), url);
        let config = std::fs::read_to_string(&self.rotator.config).unwrap();
        self.rotator.write_config(&postgres_journal(&config));
    }

    pub fn env_text(&self) -> String {
        std::fs::read_to_string(&self.env_file).unwrap()
    }

    /// (password in the URL, PGPASSWORD)
    pub fn stored_passwords(&self) -> (String, String) {
        let text = self.env_text();
        let url_line = text
            .lines()
            .find(|l| l.starts_with("LLMTRACE_POSTGRES_URL="))
            .unwrap();
        let url = url::Url::parse(&url_line["LLMTRACE_POSTGRES_URL=".len()..]).unwrap();
        let url_password = percent_encoding::percent_decode_str(url.password().unwrap())
            .decode_utf8()
            .unwrap()
            .into_owned();
        let pg_line = text.lines().find(|l| l.starts_with("PGPASSWORD=")).unwrap();
        let pgpassword = pg_line["PGPASSWORD=".len()..]
            .trim_matches('\'')
            .to_string();
        (url_password, pgpassword)
    }

    pub fn restarts(&self) -> usize {
        std::fs::read_to_string(&self.restart_log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Asserts the invariant: every store's credential logs in.
    pub async fn assert_stores_log_in(&self) {
        let (url_password, pgpassword) = self.stored_passwords();
        assert_eq!(
            url_password, pgpassword,
            "both stores hold the same password"
        );
        self.pg
            .try_login("llmtrace", &url_password, "llmtrace")
            .await
            .expect("the stored password logs in");
    }
}

/// `config` with its SQLite journal replaced by the one [`ComposeHost::use_postgres_journal`]
/// set up, and a takeover grace short enough for tests.
pub fn postgres_journal(config: &str) -> String {
    config.replace(
        "journal = \"sqlite://journal.db\"",
        "journal = \"env:ROTATOR_JOURNAL_URL\"\ntakeover_grace = \"3s\"",
    )
}

pub fn file_config(pg_address: &str, command: &[String]) -> String {
    file_builder(pg_address, command).build()
}

/// [`file_config`] with extra lines in `[rotator]` and in the target.
pub fn file_config_with(
    pg_address: &str,
    command: &[String],
    rotator_extra: &str,
    target_extra: &str,
) -> String {
    file_builder(pg_address, command)
        .rotator_lines(rotator_extra)
        .target_lines(target_extra)
        .build()
}

/// [`file_config`] as a builder: the URL and the bare password in `.env`, and `command`.
pub fn file_builder(pg_address: &str, command: &[String]) -> ConfigBuilder {
    ConfigBuilder::new()
        .postgres(pg_address)
        .store("file")
        .str("path", ".env")
        .str("key", "LLMTRACE_POSTGRES_URL")
        .file_store("PGPASSWORD", "password")
        .command_consumer(command)
}

/// A running `serve` process: its address, the token it accepts, and everything it logged.
pub struct Server {
    pub child: tokio::process::Child,
    pub base: String,
    pub token: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    pub http: reqwest::Client,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Rotator {
    /// Starts `serve` (the config must listen on `port` and read tokens from ROTATOR_API_TOKENS)
    /// and waits until /healthz answers.
    pub async fn serve(&self, port: u16) -> Server {
        self.serve_with(&self.config, port).await
    }

    /// [`Rotator::serve`] with another config file (a second replica in the same directory).
    pub async fn serve_with(&self, config: &Path, port: u16) -> Server {
        let token = random_password();
        let mut command = self.command_with(&["serve"], config);
        command.env(
            "ROTATOR_API_TOKENS",
            format!("# operators\n{token}\nsecond-token-{token}\n"),
        );
        let mut child = command.spawn().expect("serve started");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for stream in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            token,
            log,
            http: reqwest::Client::new(),
        };
        for _ in 0..200 {
            if let Ok(response) = server
                .http
                .get(format!("{}/healthz", server.base))
                .send()
                .await
            {
                if response.status().is_success() {
                    return server;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "serve did not come up; it logged:\n{}",
            server.log.lock().unwrap()
        );
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls a run until it has an outcome.
    pub async fn wait_for_run(&self, id: &str) -> serde_json::Value {
        for _ in 0..600 {
            let (status, run) = self.get(&format!("/v1/rotations/{id}")).await;
            assert_eq!(status, 200, "{run}");
            if !run["outcome"].is_null() {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("run {id} did not finish");
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        assert!(std::process::Command::new("kill")
            .args(["-s", name, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the process to exit; its exit code.
    pub async fn wait(&mut self, limit: Duration) -> i32 {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("serve exited in time")
            .unwrap()
            .code()
            .unwrap_or(-1)
    }
}

/// The value of one sample in a Prometheus text exposition, by metric name and labels.
pub fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let label_text = rest.trim_end_matches('}');
            let all = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|pair| pair == format!("{k}=\"{v}\""))
            });
            all.then(|| value.parse().ok()).flatten()
        })
}

/// RBAC proof for any config: every request the fake logged (but discovery, which needs no
/// grant) is allowed by the Role `llmtrace-rotator rbac` prints for the rotator's config, in
/// the request's namespace. Returns how many requests were checked.
pub fn assert_rbac_allows(rotator: &Rotator, kube: &KubeFake) -> usize {
    let out = std::process::Command::new(bin())
        .args(["rbac", "--namespace", NS, "--config"])
        .arg(&rotator.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // (namespace, group, resource, name or "" for any, verb)
    let mut granted = std::collections::BTreeSet::new();
    for doc in text.split("\n---\n") {
        let role: serde_json::Value = serde_yaml::from_str(doc).unwrap();
        if role["kind"] != "Role" {
            continue;
        }
        let ns = role["metadata"]["namespace"].as_str().unwrap().to_string();
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        for rule in role["rules"].as_array().unwrap() {
            let names = match strings(&rule["resourceNames"]) {
                names if names.is_empty() => vec![String::new()],
                names => names,
            };
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for name in &names {
                        for verb in strings(&rule["verbs"]) {
                            granted.insert((
                                ns.clone(),
                                group.clone(),
                                resource.clone(),
                                name.clone(),
                                verb,
                            ));
                        }
                    }
                }
            }
        }
    }
    let mut checked = 0;
    for r in kube.requests() {
        if r.resource.is_empty() {
            continue;
        }
        let group = match r.resource.as_str() {
            "secrets" => "",
            "deployments" | "statefulsets" => "apps",
            "externalsecrets" => "external-secrets.io",
            "sealedsecrets" => "bitnami.com",
            "events" => "events.k8s.io",
            other => panic!("{} {}: {other} is in no printed Role", r.method, r.path),
        };
        let seen = (
            r.namespace.clone(),
            group.to_string(),
            r.resource.clone(),
            r.name.clone(),
            r.verb.clone(),
        );
        assert!(
            granted.contains(&seen),
            "{} {} ({seen:?}) is not allowed by the printed Role:\n{text}",
            r.method,
            r.path
        );
        checked += 1;
    }
    checked
}
