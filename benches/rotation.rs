//! The benchmark behind `scripts/bench.sh`: rotation latency per backend next to OpenBao's
//! database engine, failed client logins during one rotation, the in-process floor, and the
//! footprint. Prints one markdown table. Servers are started here on loopback, like the tests.
//!
//! `ROTATOR_BIN` names the (release) binary to measure; `--quick` shortens the login windows.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::{ConnectOptions, Connection};
use support::openbao::OpenBao;
use support::postgres::Postgres;
use support::redis::{Redis, Users};
use support::rotator::random_password;

const RUNS: usize = 30;

struct Row {
    what: String,
    figure: String,
    note: String,
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn latency(samples: &mut [f64]) -> String {
    format!(
        "p50 {:.1} ms, p90 {:.1} ms (n={})",
        percentile(samples, 0.5),
        percentile(samples, 0.9),
        samples.len()
    )
}

fn bin() -> String {
    std::env::var("ROTATOR_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_llmtrace-rotator").to_string())
}

/// A directory with a config, a .env and the environment for the rotator.
struct Workdir {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Workdir {
    fn new(config: &str, dotenv: &str, env: &[(&str, &str)]) -> Workdir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rotator.toml"), config).unwrap();
        std::fs::write(dir.path().join(".env"), dotenv).unwrap();
        let key = base64_key();
        let mut all: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.push(("ROTATOR_JOURNAL_KEY".into(), key));
        all.push(("RUST_LOG".into(), "warn".into()));
        Workdir { dir, env: all }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(bin());
        command
            .args(args)
            .arg("--config")
            .arg(self.dir.path().join("rotator.toml"))
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command
    }

    /// Wall time of one `rotate`, in ms; panics unless it succeeded.
    fn rotate(&self) -> f64 {
        let started = Instant::now();
        let status = self.command(&["rotate"]).status().unwrap();
        assert!(
            status.success(),
            "rotate failed in {}",
            self.dir.path().display()
        );
        started.elapsed().as_secs_f64() * 1000.0
    }

    fn env_value(&self, key: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(".env")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap()
            .trim_matches('\'')
            .to_string()
    }
}

fn base64_key() -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = (0..2)
        .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn postgres_config(pg: &Postgres, extra: &str, command: &str) -> String {
    postgres_config_with(pg, "", extra, command)
}

/// [`postgres_config`] with `rotator` added to its `[rotator]` section.
fn postgres_config_with(pg: &Postgres, rotator: &str, extra: &str, command: &str) -> String {
    format!(
        r#"[rotator]
journal = "sqlite://journal.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"
{rotator}
[[consumer]]
name = "proxy"
kind = "command"
command = ["sh", "-c", "{command}"]
[[target]]
name = "postgres"
kind = "postgres"
address = "{}"
database = "bench"
admin = {{ user = "postgres", password = "env:PG_ADMIN_PASSWORD" }}
sslmode = "disable"
consumers = ["proxy"]
{extra}
  [[target.store]]
  kind = "file"
  path = ".env"
  key = "URL"
"#,
        pg.address()
    )
}

fn redis_config(redis: &Redis, strategy: &str, command: &str) -> String {
    format!(
        r#"[rotator]
journal = "sqlite://journal.db"
journal_key = "env:ROTATOR_JOURNAL_KEY"
[[consumer]]
name = "proxy"
kind = "command"
command = ["sh", "-c", "{command}"]
[[target]]
name = "redis"
kind = "redis"
address = "{}"
user = "app"
admin = {{ user = "admin", password = "env:REDIS_ADMIN_PASSWORD" }}
strategy = "{strategy}"
consumers = ["proxy"]
  [[target.store]]
  kind = "file"
  path = ".env"
  key = "URL"
"#,
        redis.address()
    )
}

fn url_parts(url: &str) -> (String, String) {
    let url = url::Url::parse(url).unwrap();
    let password = percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned();
    (url.username().to_string(), password)
}

/// Logs in afresh every ~10 ms with `credential()` while `work` runs: (tries, failures).
async fn client_during<C, L, LF, W>(credential: C, login: L, work: W) -> (usize, usize)
where
    C: Fn() -> (String, String) + Send + Sync + 'static,
    L: Fn(String, String) -> LF + Send + Sync + 'static,
    LF: Future<Output = bool> + Send,
    W: Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let (tries, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = {
        let (stop, tries, failures) = (stop.clone(), tries.clone(), failures.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (user, password) = credential();
                tries.fetch_add(1, Ordering::Relaxed);
                if !login(user, password).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    work.await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    (
        tries.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    )
}

async fn pg_login(pg: &Postgres, user: &str, password: &str) -> bool {
    pg.try_login(user, password, "bench").await.is_ok()
}

/// A PostgreSQL with `app` (single) and `app_a`/`app_b` (alternating) logins in database `bench`.
async fn postgres() -> (Arc<Postgres>, String) {
    let pg = Postgres::start().await;
    pg.exec("CREATE ROLE bench_owner NOLOGIN").await;
    pg.exec("CREATE DATABASE bench OWNER bench_owner").await;
    let password = random_password();
    for login in ["app", "app_a", "app_b"] {
        pg.create_login(login, &password, "bench").await;
        pg.exec(&format!("GRANT bench_owner TO {login}")).await;
    }
    (Arc::new(pg), password)
}

const RELOGIN_AFTER: &str = "verify_relogin_after = \"1s\"";

async fn rotation_rows(
    rows: &mut Vec<Row>,
    pg: &Arc<Postgres>,
    password: &str,
    redis: &Redis,
    quick: bool,
) {
    let pg_env = [("PG_ADMIN_PASSWORD", pg.admin_password())];
    let redis_env = [("REDIS_ADMIN_PASSWORD", redis.admin_password.as_str())];
    let single = Workdir::new(
        &postgres_config(pg, "user = \"app\"", "true"),
        &format!("URL={}\n", pg.url("app", password, "bench")),
        &pg_env,
    );
    let alternating = Workdir::new(
        &postgres_config(
            pg,
            "strategy = \"alternating\"\nusers = [\"app_a\", \"app_b\"]",
            "true",
        ),
        &format!("URL={}\n", pg.url("app_a", password, "bench")),
        &pg_env,
    );
    let redis_url = format!("URL=redis://app:{password}@{}/0\n", redis.address());
    let r_single = Workdir::new(
        &redis_config(redis, "single", "true"),
        &redis_url,
        &redis_env,
    );
    for (name, work) in [
        ("PostgreSQL single", &single),
        ("PostgreSQL alternating", &alternating),
        ("Redis single", &r_single),
    ] {
        let mut samples: Vec<f64> = (0..RUNS).map(|_| work.rotate()).collect();
        rows.push(Row {
            what: format!("rotation latency, {name} (file store, `true` consumer)"),
            figure: latency(&mut samples),
            note: "closed loop: preflight, apply, verify, publish, restart, verify, journal".into(),
        });
    }
    let r_dual = Workdir::new(
        &redis_config(redis, "dual", "true"),
        &format!(
            "URL=redis://app:{}@{}/0\n",
            url_parts(&r_single.env_value("URL")).1,
            redis.address()
        ),
        &redis_env,
    );
    let mut samples: Vec<f64> = (0..RUNS).map(|_| r_dual.rotate()).collect();
    rows.push(Row {
        what: "rotation latency, Redis dual (file store, `true` consumer)".into(),
        figure: latency(&mut samples),
        note: "closed loop, two passwords until retire".into(),
    });

    // Failed logins during one rotation whose consumer takes a while (a rollout).
    let pause = if quick { "sleep 1" } else { "sleep 3" };
    for (name, work, extra) in [
        ("PostgreSQL single", &single, "user = \"app\""),
        (
            "PostgreSQL alternating",
            &alternating,
            "strategy = \"alternating\"\nusers = [\"app_a\", \"app_b\"]",
        ),
    ] {
        std::fs::write(
            work.dir.path().join("rotator.toml"),
            postgres_config(pg, extra, pause),
        )
        .unwrap();
        let env_file = work.dir.path().join(".env");
        let pg_client = pg.clone();
        let (tries, failures) = client_during(
            move || {
                url_parts(
                    std::fs::read_to_string(&env_file)
                        .unwrap()
                        .trim()
                        .trim_start_matches("URL="),
                )
            },
            move |user, password| {
                let pg = pg_client.clone();
                async move { pg_login(&pg, &user, &password).await }
            },
            async {
                tokio::task::block_in_place(|| work.rotate());
            },
        )
        .await;
        rows.push(Row {
            what: format!("failed logins during one rotation, {name}"),
            figure: format!("{failures} of {tries}"),
            note: format!(
                "client logs in every ~10 ms with what the store holds; consumer `{pause}`"
            ),
        });
    }
    for (name, work, strategy) in [
        ("Redis single", &r_single, "single"),
        ("Redis dual", &r_dual, "dual"),
    ] {
        // Both workdirs rotate the same user: start from whichever rotated last.
        let latest = [&r_single, &r_dual].map(|w| w.dir.path().join(".env"));
        let newest = latest
            .iter()
            .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
            .unwrap()
            .clone();
        let own = work.dir.path().join(".env");
        if newest != own {
            std::fs::copy(&newest, &own).unwrap();
        }
        std::fs::write(
            work.dir.path().join("rotator.toml"),
            redis_config(redis, strategy, pause),
        )
        .unwrap();
        let env_file = work.dir.path().join(".env");
        let port = redis.port;
        let (tries, failures) = client_during(
            move || {
                url_parts(
                    std::fs::read_to_string(&env_file)
                        .unwrap()
                        .trim()
                        .trim_start_matches("URL="),
                )
            },
            move |user, password| async move {
                support::redis::try_connect(port, &user, &password)
                    .await
                    .is_ok()
            },
            async {
                tokio::task::block_in_place(|| work.rotate());
            },
        )
        .await;
        rows.push(Row {
            what: format!("failed logins during one rotation, {name}"),
            figure: format!("{failures} of {tries}"),
            note: format!("same client; consumer `{pause}`"),
        });
    }
}

/// `RUNS` calls of OpenBao's `rotate-role` on one static role, timed.
async fn rotate_role_row(bao: &OpenBao, role: &str, backend: &str) -> Row {
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let (status, answer) = bao
            .call(
                "POST",
                &format!("database/rotate-role/{role}"),
                Some(json!({})),
            )
            .await;
        assert!(status < 300, "rotate-role: {status} {answer}");
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Row {
        what: format!("OpenBao `rotate-role`, {backend} static role"),
        figure: latency(&mut samples),
        note: "open loop: no verification, no store, no restart".into(),
    }
}

/// OpenBao's database engine on the same Redis: a static role for an ACL user.
async fn openbao_redis_row(rows: &mut Vec<Row>, bao: &OpenBao, redis: &Redis) {
    let password = random_password();
    redis
        .admin(&[
            "ACL",
            "SETUSER",
            "bao_app",
            "on",
            &format!(">{password}"),
            "~*",
            "+@all",
        ])
        .await;
    let calls = [
        (
            "POST",
            "database/config/redis",
            json!({
                "plugin_name": "redis-database-plugin",
                "host": "127.0.0.1",
                "port": redis.port,
                "username": support::redis::ADMIN_USER,
                "password": redis.admin_password,
                "allowed_roles": ["cache"],
            }),
        ),
        (
            "POST",
            "database/static-roles/cache",
            json!({"db_name": "redis", "username": "bao_app", "rotation_period": "24h"}),
        ),
    ];
    for (method, path, body) in calls {
        let (status, answer) = bao.call(method, path, Some(body)).await;
        assert!(status < 300, "{path}: {status} {answer}");
    }
    rows.push(rotate_role_row(bao, "cache", "Redis").await);
}

/// OpenBao's database engine on the same PostgreSQL: a static role rotated by `rotate-role`.
async fn openbao_rows(rows: &mut Vec<Row>, pg: &Arc<Postgres>, redis: &Redis) {
    let bao = OpenBao::start().await;
    let password = random_password();
    pg.create_login("bao_app", &password, "bench").await;
    let calls = [
        ("POST", "sys/mounts/database", json!({"type": "database"})),
        (
            "POST",
            "database/config/pg",
            json!({
                "plugin_name": "postgresql-database-plugin",
                "connection_url": format!("postgresql://{{{{username}}}}:{{{{password}}}}@{}/bench?sslmode=disable", pg.address()),
                "username": "postgres",
                "password": pg.admin_password(),
                "allowed_roles": ["app"],
            }),
        ),
        (
            "POST",
            "database/static-roles/app",
            json!({"db_name": "pg", "username": "bao_app", "rotation_period": "24h"}),
        ),
    ];
    for (method, path, body) in calls {
        let (status, answer) = bao.call(method, path, Some(body)).await;
        assert!(status < 300, "{path}: {status} {answer}");
    }
    rows.push(rotate_role_row(&bao, "app", "PostgreSQL").await);
    openbao_redis_row(rows, &bao, redis).await;

    let bao = Arc::new(bao);
    let reader = bao.clone();
    let pg_client = pg.clone();
    let (tries, failures) = client_during(
        move || {
            let reader = reader.clone();
            // The client reads the credential from OpenBao each time, as an agent-injected app would.
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let (_, answer) = reader.call("GET", "database/static-creds/app", None).await;
                    (
                        "bao_app".to_string(),
                        answer["data"]["password"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
            })
        },
        move |user, password| {
            let pg = pg_client.clone();
            async move { pg_login(&pg, &user, &password).await }
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (status, _) = bao
                .call("POST", "database/rotate-role/app", Some(json!({})))
                .await;
            assert!(status < 300);
            tokio::time::sleep(Duration::from_millis(300)).await;
        },
    )
    .await;
    rows.push(Row {
        what: "failed logins during one rotation, OpenBao static role".into(),
        figure: format!("{failures} of {tries}"),
        note: "client reads static-creds before each login; single password".into(),
    });
}

/// Logins `{prefix}0`.. `{prefix}{n-1}` with `password`, made anew, in statements of 2,000.
async fn create_logins(pg: &Postgres, prefix: &str, n: usize, password: &str) {
    let statements: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "DROP ROLE IF EXISTS {prefix}{i}; CREATE ROLE {prefix}{i} LOGIN PASSWORD '{password}';"
            )
        })
        .collect();
    for chunk in statements.chunks(2000) {
        pg.exec(&format!("SET log_statement = 'none';{}", chunk.concat()))
            .await;
    }
}

/// A work directory rotating login `user` (whose password is `password`) of database `bench`
/// into `.env`, with `rotator` added to `[rotator]` and `sh -c true` as the consumer.
fn single_workdir(pg: &Postgres, user: &str, password: &str, rotator: &str) -> Workdir {
    Workdir::new(
        &postgres_config_with(pg, rotator, &format!("user = \"{user}\""), "true"),
        &format!("URL={}\n", pg.url(user, password, "bench")),
        &[("PG_ADMIN_PASSWORD", pg.admin_password())],
    )
}

/// A login that ends at once, as the rotator's proofs do (no statement on the new backend).
async fn login_only(pg: &Postgres, user: &str, password: &str) {
    let conn = sqlx::postgres::PgConnection::connect_with(
        &pg.connect_options(user, password, "bench")
            .disable_statement_logging(),
    )
    .await
    .unwrap();
    conn.close().await.unwrap();
}

/// A fresh admin session: what each run opens to check its rights and change the password.
async fn admin_session(pg: &Postgres) -> sqlx::postgres::PgConnection {
    sqlx::postgres::PgConnection::connect_with(
        &pg.connect_options("postgres", pg.admin_password(), "postgres")
            .disable_statement_logging(),
    )
    .await
    .unwrap()
}

/// A login the in-process rows rotate, with the admin session that changes it.
struct InProcess<'a> {
    pg: &'a Postgres,
    admin: sqlx::postgres::PgConnection,
    user: &'static str,
    password: String,
}

impl<'a> InProcess<'a> {
    async fn new(pg: &'a Postgres, user: &'static str) -> InProcess<'a> {
        let password = random_password();
        pg.create_login(user, &password, "bench").await;
        InProcess {
            pg,
            admin: admin_session(pg).await,
            user,
            password,
        }
    }

    /// The floor: a SCRAM login, `ALTER ROLE` with a verifier computed here, a SCRAM login with
    /// the new password, on a kept admin session. Milliseconds.
    async fn floor(&mut self) -> f64 {
        let next = random_password();
        let started = Instant::now();
        assert!(pg_login(self.pg, self.user, &self.password).await);
        alter_password(&mut self.admin, self.user, &next).await;
        assert!(pg_login(self.pg, self.user, &next).await);
        self.password = next;
        started.elapsed().as_secs_f64() * 1000.0
    }

    /// One rotation's proofs as DESIGN.md asks for them, and nothing else (no journal, store,
    /// consumer or process start): a fresh admin login beside the current credential's login,
    /// the `ALTER ROLE`, then the new credential's login before publishing and again at verify.
    async fn proofs(&mut self) -> f64 {
        let (pg, user) = (self.pg, self.user);
        let next = random_password();
        let started = Instant::now();
        let (mut admin, ()) = tokio::join!(admin_session(pg), login_only(pg, user, &self.password));
        alter_password(&mut admin, user, &next).await;
        login_only(pg, user, &next).await;
        login_only(pg, user, &next).await;
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        admin.close().await.unwrap();
        self.password = next;
        elapsed
    }
}

/// A running `serve` rotating its own login, and a client of its API.
struct ApiDaemon {
    _work: Workdir,
    child: std::process::Child,
    http: reqwest::Client,
    base: String,
}

impl ApiDaemon {
    async fn start(pg: &Postgres, user: &str, password: &str, rotator: &str) -> ApiDaemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        pg.create_login(user, password, "bench").await;
        let rotator = format!(
            "listen = \"127.0.0.1:{port}\"\napi_tokens = \"literal:bench\"\ncheck_interval = \"0s\"\n{rotator}"
        );
        let work = single_workdir(pg, user, password, &rotator);
        let mut child = work.command(&["serve"]).spawn().unwrap();
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("serve exited ({status}) in {}", work.dir.path().display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ApiDaemon {
            _work: work,
            child,
            http,
            base,
        }
    }

    /// `POST /v1/rotations`, then one `GET` that waits for the outcome. Milliseconds.
    async fn rotate(&self) -> f64 {
        let (http, base) = (&self.http, &self.base);
        let started = Instant::now();
        let answer = answer_of(http.post(format!("{base}/v1/rotations")).json(&json!({}))).await;
        let Some(id) = answer["id"].as_str().map(str::to_string) else {
            panic!("no run id in the answer: {answer}");
        };
        let run = answer_of(http.get(format!("{base}/v1/rotations/{id}?wait=30s"))).await;
        assert_eq!(run["outcome"], "succeeded", "{run}");
        started.elapsed().as_secs_f64() * 1000.0
    }
}

impl Drop for ApiDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The overhead rows, sampled in turn within each of `RUNS` rounds (floor, proofs, `rotate`,
/// the API, and both with `verify_relogin_after`): the VM's pace drifts by up to 1.5× between
/// rows measured a minute apart, so each ratio is the median of its per-round ratios.
async fn overhead_rows(rows: &mut Vec<Row>, pg: &Postgres, password: &str) {
    let mut floor = InProcess::new(pg, "floor").await;
    let mut proofs = InProcess::new(pg, "proofs").await;
    for user in ["over_cli", "over_cli_relogin"] {
        pg.create_login(user, password, "bench").await;
    }
    let cli = single_workdir(pg, "over_cli", password, "");
    let cli_relogin = single_workdir(pg, "over_cli_relogin", password, RELOGIN_AFTER);
    let api = ApiDaemon::start(pg, "over_api", password, "").await;
    let api_relogin = ApiDaemon::start(pg, "over_api_relogin", password, RELOGIN_AFTER).await;
    let mut samples: [Vec<f64>; 6] = Default::default();
    for _ in 0..RUNS {
        samples[0].push(floor.floor().await);
        samples[1].push(proofs.proofs().await);
        samples[2].push(tokio::task::block_in_place(|| cli.rotate()));
        samples[3].push(api.rotate().await);
        samples[4].push(tokio::task::block_in_place(|| cli_relogin.rotate()));
        samples[5].push(api_relogin.rotate().await);
    }
    let named = [
        (
            "in-process floor: SCRAM login + ALTER ROLE + SCRAM login".to_string(),
            "the least any verified PostgreSQL rotation costs on this machine",
        ),
        (
            "in-process proofs: fresh admin login ∥ current login, ALTER ROLE, 2 new logins".into(),
            "what one rotation's proofs cost before any journal, store, restart or process",
        ),
        (
            "`rotate`, PostgreSQL single (file store, `sh -c true` consumer)".into(),
            "closed loop, process start included",
        ),
        (
            "rotation latency through `POST /v1/rotations` on a running daemon (PostgreSQL single)".into(),
            "POST, then `GET /v1/rotations/{id}?wait=30s` answered at the outcome; no process start",
        ),
        (
            format!("`rotate` with `{RELOGIN_AFTER}`, PostgreSQL single"),
            "verify reads every store back and takes verify-backend's login as proof",
        ),
        (
            format!("API rotation with `{RELOGIN_AFTER}`, PostgreSQL single"),
            "as the API row, with one login fewer",
        ),
    ];
    for ((what, note), samples) in named.iter().zip(&samples) {
        rows.push(Row {
            what: what.clone(),
            figure: latency(&mut samples.clone()),
            note: format!("{note}; sampled in turn with the rows beside it"),
        });
    }
    let ratios = [
        (
            1,
            "in-process proofs",
            "the least any ratio below can be with every proof DESIGN.md asks for".to_string(),
        ),
        (2, "`rotate`", "target ≤ 2.5".into()),
        (3, "`POST /v1/rotations`", "target ≤ 1.5".into()),
        (
            4,
            "`rotate` with `verify_relogin_after`",
            "target ≤ 2.5 (opt-in, not the default)".into(),
        ),
        (
            5,
            "API with `verify_relogin_after`",
            "target ≤ 1.5 (opt-in, not the default)".into(),
        ),
    ];
    for (k, what, note) in ratios {
        let mut per_round: Vec<f64> = samples[k]
            .iter()
            .zip(&samples[0])
            .map(|(x, f)| x / f)
            .collect();
        rows.push(Row {
            what: format!("ratio: {what} / in-process floor, median of per-round ratios"),
            figure: format!("{:.1}", percentile(&mut per_round, 0.5)),
            note,
        });
    }
}

/// `ALTER ROLE user PASSWORD` with a verifier computed here, as the rotator sends it.
async fn alter_password(admin: &mut sqlx::postgres::PgConnection, user: &str, password: &str) {
    let verifier = llmtrace_rotator::backend::scram::verifier(
        &llmtrace_rotator::secret::Secret::new(password),
    );
    let sql = format!("ALTER ROLE {user} PASSWORD '{}'", verifier.expose());
    sqlx::query(&sql).execute(admin).await.unwrap();
}

/// The same proofs for `n` logins, `parallel` at a time on `parallel` admin sessions kept for
/// the whole run (as a fleet run keeps them): the least a fleet run can take here.
async fn fleet_proofs_seconds(pg: &Postgres, n: usize, parallel: usize) -> f64 {
    use futures_util::StreamExt;
    let password = random_password();
    create_logins(pg, "proofs", n, &password).await;
    let admins = tokio::sync::Mutex::new(Vec::new());
    for _ in 0..parallel {
        admins.lock().await.push(admin_session(pg).await);
    }
    let started = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let (admins, password) = (&admins, &password);
            async move {
                let user = format!("proofs{i}");
                let next = random_password();
                login_only(pg, &user, password).await;
                let mut admin = admins.lock().await.pop().expect("one admin per task");
                alter_password(&mut admin, &user, &next).await;
                admins.lock().await.push(admin);
                login_only(pg, &user, &next).await;
                login_only(pg, &user, &next).await;
            }
        })
        .buffer_unordered(parallel)
        .collect::<Vec<()>>()
        .await;
    started.elapsed().as_secs_f64()
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A config and .env with `n` PostgreSQL targets (`t0`...), each a login of its own.
async fn many_targets(pg: &Postgres, n: usize, password: &str) -> Workdir {
    many_targets_with(pg, n, password, "", Stores::OneFile).await
}

/// Where the targets of [`many_targets_with`] keep their URLs.
#[derive(Clone, Copy, PartialEq)]
enum Stores {
    /// One .env with a key per target: every write rewrites the whole file, so a run's publish
    /// costs grow with the square of the target count.
    OneFile,
    /// A .env per target, as a fleet keeps one Secret (or vault path) per credential.
    FilePerTarget,
}

/// [`many_targets`] with extra lines in `[rotator]`.
async fn many_targets_with(
    pg: &Postgres,
    n: usize,
    password: &str,
    rotator: &str,
    stores: Stores,
) -> Workdir {
    let mut config = format!("[rotator]\njournal = \"sqlite://journal.db\"\njournal_key = \"env:ROTATOR_JOURNAL_KEY\"\nlisten = \"127.0.0.1:0\"\napi_tokens = \"literal:bench\"\ncheck_interval = \"0s\"\n{rotator}\n[[consumer]]\nname = \"proxy\"\nkind = \"command\"\ncommand = [\"true\"]\n");
    let mut dotenv = String::new();
    let mut own_files = Vec::new();
    create_logins(pg, "many", n, password).await;
    for i in 0..n {
        let url = pg.url(&format!("many{i}"), password, "bench");
        let (path, key) = match stores {
            Stores::OneFile => {
                dotenv.push_str(&format!("URL{i}={url}\n"));
                (".env".to_string(), format!("URL{i}"))
            }
            Stores::FilePerTarget => {
                let path = format!("env/t{i}.env");
                own_files.push((path.clone(), format!("URL={url}\n")));
                (path, "URL".to_string())
            }
        };
        config.push_str(&format!(
            "[[target]]\nname = \"t{i}\"\nkind = \"postgres\"\naddress = \"{}\"\ndatabase = \"bench\"\nuser = \"many{i}\"\nadmin = {{ user = \"postgres\", password = \"env:PG_ADMIN_PASSWORD\" }}\nsslmode = \"disable\"\nschedule = \"0 3 * * SUN\"\nconsumers = [\"proxy\"]\n  [[target.store]]\n  kind = \"file\"\n  path = \"{path}\"\n  key = \"{key}\"\n",
            pg.address()
        ));
    }
    let work = Workdir::new(
        &config,
        &dotenv,
        &[("PG_ADMIN_PASSWORD", pg.admin_password())],
    );
    if !own_files.is_empty() {
        std::fs::create_dir(work.dir.path().join("env")).unwrap();
    }
    for (path, text) in own_files {
        std::fs::write(work.dir.path().join(path), text).unwrap();
    }
    work
}

/// One run over `n` targets with `max_parallel`, timed; its wall time in seconds and peak RSS.
async fn fleet_run(
    pg: &Postgres,
    password: &str,
    n: usize,
    max_parallel: usize,
    stores: Stores,
) -> (f64, u64) {
    fleet_run_with(
        pg,
        password,
        n,
        &format!("max_parallel = {max_parallel}"),
        stores,
    )
    .await
}

/// One `rotate` over `n` targets with `rotator` in `[rotator]`: seconds, and peak RSS in KiB.
async fn fleet_run_with(
    pg: &Postgres,
    password: &str,
    n: usize,
    rotator: &str,
    stores: Stores,
) -> (f64, u64) {
    let work = many_targets_with(pg, n, password, rotator, stores).await;
    let started = Instant::now();
    let mut child = work.command(&["rotate"]).spawn().unwrap();
    let mut peak = 0;
    loop {
        if let Some(kib) = rss_kib(child.id(), "VmHWM:") {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "rotate over {n} targets failed");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (started.elapsed().as_secs_f64(), peak)
}

async fn fleet_rows(rows: &mut Vec<Row>, pg: &Postgres, password: &str, quick: bool) {
    // The ratios' denominator, measured around the runs they divide (10 rotations before each
    // and after the last): the VM's pace drifts between rows a minute apart.
    pg.create_login("fleet_single", password, "bench").await;
    let single = single_workdir(pg, "fleet_single", password, "");
    let mut around = Vec::new();
    let sample_single = |around: &mut Vec<f64>| {
        around.extend((0..10).map(|_| tokio::task::block_in_place(|| single.rotate())));
    };
    let sizes: &[usize] = if quick {
        &[10, 100, 1000]
    } else {
        &[10, 100, 1000, 10_000]
    };
    let default = llmtrace_rotator::config::DEFAULT_MAX_PARALLEL;
    let mut seconds = std::collections::BTreeMap::new();
    for &n in sizes {
        for max_parallel in [1, default] {
            let around_this = n == 1000 && max_parallel == default;
            if around_this {
                sample_single(&mut around);
            }
            let (elapsed, peak) =
                fleet_run(pg, password, n, max_parallel, Stores::FilePerTarget).await;
            if around_this {
                sample_single(&mut around);
            }
            seconds.insert((n, max_parallel), elapsed);
            rows.push(Row {
                what: format!("one run over {n} targets, max_parallel {max_parallel}"),
                figure: format!("{elapsed:.2} s, peak RSS {:.1} MiB", peak as f64 / 1024.0),
                note: "a .env per target; one transaction, one restart; backend steps \
                       max_parallel targets at a time"
                    .into(),
            });
        }
    }
    let (elapsed, _) = fleet_run(pg, password, 1000, default, Stores::OneFile).await;
    rows.push(Row {
        what: format!("one run over 1000 targets sharing one .env, max_parallel {default}"),
        figure: format!("{elapsed:.2} s"),
        note: "every write rewrites the whole file: publish grows with the square of the count"
            .into(),
    });
    // A fleet verifies each target long after its verify-backend (every target publishes, then
    // the consumers restart): the setting must outlast that to spare the logins.
    let relogin = "verify_relogin_after = \"10m\"";
    let (elapsed, _) = fleet_run_with(
        pg,
        password,
        1000,
        &format!("max_parallel = {default}\n{relogin}"),
        Stores::FilePerTarget,
    )
    .await;
    rows.push(Row {
        what: format!("one run over 1000 targets, max_parallel {default}, `{relogin}`"),
        figure: format!("{elapsed:.2} s"),
        note: "opt-in: verify takes verify-backend's login as proof, one login fewer per target"
            .into(),
    });
    let proofs = fleet_proofs_seconds(pg, 1000, default).await;
    sample_single(&mut around);
    let single_ms = percentile(&mut around, 0.5);
    rows.push(Row {
        what: "`rotate`, PostgreSQL single, around the 1,000-target runs".into(),
        figure: latency(&mut around),
        note: "10 rotations before and after the run over 1,000 targets, and after the proofs \
               over 1,000 logins: the two ratios below divide by its p50"
            .into(),
    });
    rows.push(Row {
        what: format!("in-process proofs over 1000 logins, {default} at a time"),
        figure: format!("{proofs:.2} s"),
        note: "each target's proofs (as in the in-process proofs row) on warm admin \
               sessions: the least a run over 1,000 targets takes here"
            .into(),
    });
    rows.push(Row {
        what: "ratio: in-process proofs over 1,000 logins / one single-target rotation".into(),
        figure: format!("{:.0}", proofs * 1000.0 / single_ms),
        note: "the bound the 1,000-target ratio below cannot go under".into(),
    });
    let (t100, t1000) = (seconds[&(100, default)], seconds[&(1000, default)]);
    rows.push(Row {
        what: "ratio: 1,000 targets / 100 targets (default max_parallel)".into(),
        figure: format!("{:.1}", t1000 / t100),
        note: "target ≤ 11: a checkpoint's cost does not grow with the run".into(),
    });
    rows.push(Row {
        what: "ratio: 1,000 targets / one single-target rotation".into(),
        figure: format!("{:.0}", t1000 * 1000.0 / single_ms),
        note: "target ≤ 250".into(),
    });
}

/// The JSON answer to `request`, sent with the benchmark's API token.
async fn answer_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    request
        .bearer_auth("bench")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn footprint_rows(rows: &mut Vec<Row>, pg: &Postgres, password: &str, quick: bool) {
    for n in [3, 1000, 10_000] {
        let work = many_targets(pg, n, password).await;
        let mut child = work.command(&["serve"]).spawn().unwrap();
        tokio::time::sleep(Duration::from_secs(if quick { 3 } else { 5 })).await;
        let rss = rss_kib(child.id(), "VmRSS:").unwrap_or(0);
        let _ = child.kill();
        let _ = child.wait();
        rows.push(Row {
            what: format!("idle RSS of `serve`, {n} scheduled targets"),
            figure: format!("{:.1} MiB", rss as f64 / 1024.0),
            note: "VmRSS a few seconds after start".into(),
        });
    }
    start_row(rows, pg, password).await;
}

/// From spawning `rotate` to its first connection to the backend, which is a listener here
/// that accepts and closes: what a run pays before preflight (process start, config, journal
/// open and migrations, recovery check, lock, run record).
async fn start_row(rows: &mut Vec<Row>, pg: &Postgres, password: &str) {
    let work = many_targets(pg, 1, password).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config_path = work.dir.path().join("rotator.toml");
    let config = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace(&pg.address(), &listener.local_addr().unwrap().to_string());
    std::fs::write(&config_path, config).unwrap();
    // Accepts and at once closes every connection, so each run fails fast after its first.
    let (accepted, connections) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for connection in listener.incoming() {
            if accepted.send(Instant::now()).is_err() {
                break;
            }
            drop(connection);
        }
    });
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        while connections.try_recv().is_ok() {}
        let started = Instant::now();
        let mut child = work.command(&["rotate"]).spawn().unwrap();
        let first = connections
            .recv_timeout(Duration::from_secs(60))
            .expect("rotate connected to the listener");
        samples.push((first - started).as_secs_f64() * 1000.0);
        let _ = child.wait();
    }
    rows.push(Row {
        what: "`rotate`: process start to first backend connection".into(),
        figure: latency(&mut samples),
        note:
            "process start, config, journal open and migrations, recovery check, lock, run record"
                .into(),
    });
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let started = Instant::now();
    let (pg, password) = postgres().await;
    let redis = Redis::start(Users::AclFile, &[("app", &password)], "").await;
    let mut rows = Vec::new();
    // `ROTATOR_BENCH_ONLY=overhead` (floor, proofs, `rotate`, API, start) or `fleet` (single
    // rotation, 1,000 targets): a subset for iterating; the full table is the default.
    match std::env::var("ROTATOR_BENCH_ONLY").as_deref() {
        Ok("overhead") => {
            overhead_rows(&mut rows, &pg, &password).await;
            start_row(&mut rows, &pg, &password).await;
            return print_rows(rows, quick, started);
        }
        Ok("fleet") => {
            fleet_rows(&mut rows, &pg, &password, quick).await;
            return print_rows(rows, quick, started);
        }
        _ => {}
    }
    rotation_rows(&mut rows, &pg, &password, &redis, quick).await;
    openbao_rows(&mut rows, &pg, &redis).await;
    overhead_rows(&mut rows, &pg, &password).await;
    footprint_rows(&mut rows, &pg, &password, quick).await;
    fleet_rows(&mut rows, &pg, &password, quick).await;
    print_rows(rows, quick, started);
}

fn print_rows(rows: Vec<Row>, quick: bool, started: Instant) {
    println!("| measurement | result | what bounds it |");
    println!("|---|---|---|");
    for row in rows {
        println!("| {} | {} | {} |", row.what, row.figure, row.note);
    }
    println!(
        "\n{} cores, {}; binary {}; {} in {:.0} s",
        num_cpus(),
        std::env::consts::ARCH,
        bin(),
        if quick { "--quick" } else { "full run" },
        started.elapsed().as_secs_f64()
    );
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
