//! `rotate` of a ClickHouse user defined in users.xml, against Debian's clickhouse-server
//! (18.16, no SQL user management): the rotator owns a users.d file and waits for the reload.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::config::{quoted, ConfigBuilder};

use support::clickhouse::ClickHouse;
use support::rotator::{assert_no_secret, random_password, Rotator};

struct Host {
    ch: ClickHouse,
    rotator: Rotator,
    old: String,
    env_file: PathBuf,
}

/// The `clickhouse` target in users_xml mode, its file stores and consumer `proxy`.
fn clickhouse(address: &str, users_xml: &str, strategy: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .target("clickhouse", "clickhouse", address)
        .str("mode", "users_xml")
        .set("users_xml", format!("{{ path = {} }}", quoted(users_xml)))
        .str("strategy", strategy)
        .set("consumers", r#"["proxy"]"#)
        .file_store("LLMTRACE_CLICKHOUSE_URL", "url")
}

fn config(user: &str, address: &str, users_xml: &str, strategy: &str, command: &[&str]) -> String {
    clickhouse(address, users_xml, strategy)
        .target_set("user", quoted(user))
        .file_store("CLICKHOUSE_ADMIN_PASSWORD", "password")
        .command_consumer(command)
        .build()
}

impl Host {
    /// `None` (the test skips) where clickhouse-server is not installed.
    async fn start(strategy: &str, command: &[&str]) -> Option<Host> {
        Host::start_as("llmtrace", strategy, command).await
    }

    async fn start_as(user: &str, strategy: &str, command: &[&str]) -> Option<Host> {
        let old = random_password();
        let ch = ClickHouse::start(user, &old).await?;
        let users_xml = ch.users_d().join("llmtrace-rotator.xml");
        let rotator = Rotator::new(&config(
            user,
            &ch.address(),
            &users_xml.display().to_string(),
            strategy,
            command,
        ));
        let env_file = rotator.path(".env");
        std::fs::write(
            &env_file,
            format!(
                "LLMTRACE_CLICKHOUSE_URL=http://{user}:{old}@{}\nLLMTRACE_CLICKHOUSE_DATABASE=default\nCLICKHOUSE_ADMIN_PASSWORD={old}\n",
                ch.address()
            ),
        )
        .unwrap();
        Some(Host {
            ch,
            rotator,
            old,
            env_file,
        })
    }

    fn env_text(&self) -> String {
        std::fs::read_to_string(&self.env_file).unwrap()
    }

    fn stored(&self) -> String {
        let text = self.env_text();
        let (_, password) = parse_env(&text);
        let bare = text
            .lines()
            .find_map(|l| l.strip_prefix("CLICKHOUSE_ADMIN_PASSWORD="))
            .unwrap();
        assert_eq!(password, bare, "both stores hold the same password");
        password
    }

    /// No password in the rotator's output; the new one nowhere in the server's files or logs.
    fn assert_clean(&self, output: &str) {
        let new = self.stored();
        assert_no_secret(
            output,
            &[self.old.as_str(), new.as_str()],
            "rotator output at trace level",
        );
        assert_no_secret(
            &self.ch.files_text(),
            &[new.as_str()],
            "ClickHouse's files and logs",
        );
    }
}

fn parse_env(text: &str) -> (String, String) {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("LLMTRACE_CLICKHOUSE_URL="))
        .unwrap();
    let url = url::Url::parse(line).unwrap();
    let password = percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned();
    (url.username().to_string(), password)
}

#[tokio::test(flavor = "multi_thread")]
async fn users_xml_rotation_writes_the_users_d_file_and_waits_for_the_reload() {
    let Some(host) = Host::start("single", &["true"]).await else {
        return;
    };

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = host.stored();
    assert_ne!(new, host.old);
    host.ch
        .try_login("llmtrace", &new)
        .await
        .expect("new password logs in");
    assert!(host.ch.try_login("llmtrace", &host.old).await.is_err());
    let file = std::fs::read_to_string(host.ch.users_d().join("llmtrace-rotator.xml")).unwrap();
    assert!(file.contains("<password_sha256_hex>"), "{file}");
    // A second rotation replaces the rotator's own file.
    let again = host.rotator.run(&["rotate"]).await;
    assert_eq!(again.code, 0, "{}", again.all());
    host.ch
        .try_login("llmtrace", &host.stored())
        .await
        .expect("logs in");
    host.assert_clean(&format!("{}{}", out.all(), again.all()));
    assert_no_secret(
        &host.ch.files_text(),
        &[new.as_str()],
        "ClickHouse's files and logs",
    );
}

/// "--" may not occur inside an XML comment (XML 1.0 §2.5); the server's parser refuses the
/// whole users.d file, so a user name with "--" must not be copied into the comment.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_name_with_a_double_hyphen_keeps_the_users_d_file_well_formed() {
    let Some(host) = Host::start_as("svc--ro", "single", &["true"]).await else {
        return;
    };

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = host.stored();
    assert_ne!(new, host.old);
    host.ch
        .try_login("svc--ro", &new)
        .await
        .expect("new password logs in");
    assert!(host.ch.try_login("svc--ro", &host.old).await.is_err());
    host.assert_clean(&out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_restart_rolls_back_the_users_d_file() {
    let Some(host) = Host::start("single", &["false"]).await else {
        return;
    };
    let before = host.env_text();

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back", "{report:#}");
    assert_eq!(host.env_text(), before);
    host.ch
        .try_login("llmtrace", &host.old)
        .await
        .expect("old password logs in");
    host.assert_clean(&out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_is_refused_in_users_xml_mode() {
    let Some(host) = Host::start("dual", &["true"]).await else {
        return;
    };
    let out = host.rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.all().contains("users.xml holds one password per user"),
        "{}",
        out.all()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn single_rotation_failed_logins_are_counted() {
    let Some(host) = Host::start("single", &["sleep", "2"]).await else {
        return;
    };
    let (stop, client) = spawn_login_client(host.ch.address(), host.env_file.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (attempts, failures) = client.await.unwrap();
    assert_eq!(out.code, 0, "{}", out.all());
    let wall = out.json()["duration_ms"].as_u64().unwrap();
    println!("clickhouse users_xml single: rotation wall time {wall} ms, {attempts} logins, {failures} failed");
    assert!(attempts > 100, "the client kept trying: {attempts}");
    host.assert_clean(&out.all());
}

/// A workload that logs in every ~10 ms with what the dotenv file holds at that moment, on a
/// fresh connection each time; returns (attempts, failures) once `stop` is set.
fn spawn_login_client(
    address: String,
    env_file: PathBuf,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(usize, usize)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            let (mut attempts, mut failures) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let (user, password) = parse_env(&std::fs::read_to_string(&env_file).unwrap());
                attempts += 1;
                let ok = match http
                    .get(format!("http://{address}/?query=SELECT%201"))
                    .header("X-ClickHouse-User", user)
                    .header("X-ClickHouse-Key", password)
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success(),
                    Err(_) => false,
                };
                failures += usize::from(!ok);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (attempts, failures)
        })
    };
    (stop, handle)
}

/// An alternating pair defined in users.xml (the second user with `profile`), its users.d file
/// path, and a rotator whose store names the first user.
async fn start_pair(
    profile_b: &str,
    users: &str,
    command: &[&str],
) -> Option<(ClickHouse, Rotator, String, String, PathBuf)> {
    let (old_a, old_b) = (random_password(), random_password());
    let ch = ClickHouse::start_users(&[("app_a", &old_a, "default"), ("app_b", &old_b, profile_b)])
        .await?;
    let users_xml = ch.users_d().join("llmtrace-rotator.xml");
    let rotator = Rotator::new(
        &clickhouse(
            &ch.address(),
            &users_xml.display().to_string(),
            "alternating",
        )
        .target_set("users", users)
        .command_consumer(command)
        .build(),
    );
    let env_file = rotator.path(".env");
    std::fs::write(
        &env_file,
        format!(
            "LLMTRACE_CLICKHOUSE_URL=http://app_a:{old_a}@{}\n",
            ch.address()
        ),
    )
    .unwrap();
    Some((ch, rotator, old_a, old_b, env_file))
}

/// users.d files are merged over users.xml and re-read while the server runs (ClickHouse
/// dbms/src/Common/Config/ConfigProcessor.cpp `getConfigMergeFiles`, the `remove` attribute;
/// dbms/src/Common/Config/ConfigReloader.cpp): rewriting only the idle user's entry leaves the
/// active user's logins untouched, so a workload that follows the store never fails a login.
#[tokio::test(flavor = "multi_thread")]
async fn alternating_users_xml_moves_the_stores_to_the_idle_user_without_a_failed_login() {
    let Some((ch, rotator, old_a, old_b, env_file)) =
        start_pair("default", r#"["app_a", "app_b"]"#, &["sleep", "2"]).await
    else {
        return;
    };
    let (stop, client) = spawn_login_client(ch.address(), env_file.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let first = rotator.run(&["rotate", "--output", "json"]).await;
    let (user_1, new_1) = parse_env(&std::fs::read_to_string(&env_file).unwrap());
    let a_after_first = ch.try_login("app_a", &old_a).await;
    let second = rotator.run(&["rotate", "--output", "json"]).await;

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (attempts, failures) = client.await.unwrap();
    assert_eq!(first.code, 0, "{}", first.all());
    assert_eq!(second.code, 0, "{}", second.all());
    let wall = first.json()["duration_ms"].as_u64().unwrap()
        + second.json()["duration_ms"].as_u64().unwrap();
    println!("clickhouse users_xml alternating: two rotations, wall time {wall} ms, {attempts} logins, {failures} failed");
    assert!(attempts > 100, "the client kept trying: {attempts}");
    assert_eq!(failures, 0, "no login failed during either rotation");

    // The first rotation moved the store to app_b; app_a kept its users.xml password.
    assert_eq!(user_1, "app_b");
    assert_ne!(new_1, old_b);
    a_after_first.expect("active user untouched");
    // The second moved it back to app_a with a new password, keeping app_b's entry as it was.
    let (user_2, new_2) = parse_env(&std::fs::read_to_string(&env_file).unwrap());
    assert_eq!(user_2, "app_a");
    ch.try_login("app_a", &new_2)
        .await
        .expect("new password of app_a");
    assert!(ch.try_login("app_a", &old_a).await.is_err());
    ch.try_login("app_b", &new_1)
        .await
        .expect("app_b left as it was");
    let file = std::fs::read_to_string(ch.users_d().join("llmtrace-rotator.xml")).unwrap();
    assert_eq!(file.matches("<password_sha256_hex>").count(), 2, "{file}");
    assert_no_secret(
        &format!("{}{}", first.all(), second.all()),
        &[&old_a, &old_b, &new_1, &new_2],
        "rotator output",
    );
    assert_no_secret(
        &ch.files_text(),
        &[&new_1, &new_2],
        "ClickHouse's files and logs",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn alternating_rollback_leaves_the_idle_user_a_password_nobody_knows() {
    // The consumer keeps what it was given (the idle user's new credential), then fails.
    let seen = tempfile::NamedTempFile::new().unwrap();
    let Some((ch, rotator, old_a, old_b, env_file)) = start_pair(
        "default",
        r#"["app_a", "app_b"]"#,
        &[
            "sh",
            "-c",
            &format!("cat .env >> {}; false", seen.path().display()),
        ],
    )
    .await
    else {
        return;
    };
    let before = std::fs::read_to_string(&env_file).unwrap();

    let out = rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back", "{}", out.all());
    assert_eq!(std::fs::read_to_string(&env_file).unwrap(), before);
    let (user, rolled_out) = parse_env(&std::fs::read_to_string(seen.path()).unwrap());
    assert_eq!(user, "app_b");
    ch.try_login("app_a", &old_a)
        .await
        .expect("active user untouched");
    assert!(
        ch.try_login("app_b", &rolled_out).await.is_err(),
        "the rolled-back password no longer logs in"
    );
    assert!(
        ch.try_login("app_b", &old_b).await.is_err(),
        "nor the one users.xml had"
    );
    assert_no_secret(&out.all(), &[&old_a, &old_b, &rolled_out], "rotator output");
}

#[tokio::test(flavor = "multi_thread")]
async fn alternating_preflight_names_what_differs_between_the_users_and_changes_nothing() {
    let Some((ch, rotator, old_a, old_b, env_file)) =
        start_pair("readonly", r#"["app_a", "app_b"]"#, &["true"]).await
    else {
        return;
    };
    let before = std::fs::read_to_string(&env_file).unwrap();

    let out = rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused", "{}", out.all());
    assert!(
        out.stdout
            .contains(r#"users \"app_a\" and \"app_b\" differ in profile"#),
        "{}",
        out.stdout
    );
    assert_eq!(std::fs::read_to_string(&env_file).unwrap(), before);
    assert!(!ch.users_d().join("llmtrace-rotator.xml").exists());
    ch.try_login("app_a", &old_a).await.expect("unchanged");
    ch.try_login("app_b", &old_b).await.expect("unchanged");

    // A difference merged from conf.d (beside users.xml, as the server merges it) counts too.
    drop((ch, rotator));
    let Some((ch, rotator, _, _, _)) =
        start_pair("default", r#"["app_a", "app_b"]"#, &["true"]).await
    else {
        return;
    };
    let conf_d = ch.users_d().with_file_name("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::write(
        conf_d.join("quota.xml"),
        "<yandex><users><app_b><quota>other</quota></app_b></users></yandex>",
    )
    .unwrap();
    let out = rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout
            .contains(r#"users \"app_a\" and \"app_b\" differ in quota"#),
        "{}",
        out.stdout
    );

    // A user missing from every users file is named too.
    let text = std::fs::read_to_string(&rotator.config)
        .unwrap()
        .replace(r#"["app_a", "app_b"]"#, r#"["app_a", "app_c"]"#);
    rotator.write_config(&text);
    let out = rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stdout.contains(r#"user \"app_c\" is not defined in"#),
        "{}",
        out.stdout
    );
    assert!(!ch.users_d().join("llmtrace-rotator.xml").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_mode_on_a_server_without_sql_users_is_refused_pointing_at_users_xml() {
    let Some(host) = Host::start("single", &["true"]).await else {
        return;
    };
    let text = std::fs::read_to_string(&host.rotator.config).unwrap();
    let start = text.find("mode = \"users_xml\"").unwrap();
    let end = start + text[start..].find("strategy").unwrap();
    let sql = format!(
        "{}admin = {{ user = \"default\", password = \"env:CH_ADMIN\" }}\n{}",
        &text[..start],
        &text[end..]
    );
    host.rotator.write_config(&sql);
    let mut host = host;
    host.rotator
        .env
        .insert("CH_ADMIN".into(), host.ch.admin_password.clone());

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout.contains("use mode = \\\"users_xml\\\""),
        "{}",
        out.stdout
    );
    host.ch
        .try_login("llmtrace", &host.old)
        .await
        .expect("nothing changed");
    assert_no_secret(
        &out.all(),
        &[host.old.as_str(), host.ch.admin_password.as_str()],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn users_d_file_is_created_0640_exclusively_and_keeps_mode_and_owner_when_replaced() {
    use std::os::unix::fs::MetadataExt;
    let Some(host) = Host::start("single", &["true"]).await else {
        return;
    };
    let file = host.ch.users_d().join("llmtrace-rotator.xml");
    // Something planted at a predictable temp name is neither followed nor overwritten.
    let victim = host.rotator.path("victim.txt");
    std::fs::write(&victim, "untouched").unwrap();
    let planted = host.ch.users_d().join(".llmtrace-rotator.xml.rotator-tmp");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();

    let out = host.rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(
        meta.mode() & 0o777,
        0o640,
        "a new users.d file is not world-readable"
    );
    assert_eq!(
        meta.gid(),
        std::fs::metadata(host.ch.users_d()).unwrap().gid()
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");

    // Replacing keeps what the operator set: mode, and owner where we may (as root).
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let root = rustix::process::geteuid().is_root();
    if root {
        std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
    }
    let again = host.rotator.run(&["rotate"]).await;
    assert_eq!(again.code, 0, "{}", again.all());
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.mode() & 0o777, 0o600);
    if root {
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    }
    host.ch
        .try_login("llmtrace", &host.stored())
        .await
        .expect("the stored password logs in");
    let leftovers: Vec<String> = std::fs::read_dir(host.ch.users_d())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".rotator-") && n != ".llmtrace-rotator.xml.rotator-tmp")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
#[should_panic(expected = "clickhouse-server is not installed, and CI is set")]
fn a_missing_server_fails_the_test_under_ci() {
    support::skip_under(true, "clickhouse-server is not installed");
}

#[test]
fn a_missing_server_skips_the_test_outside_ci() {
    support::skip_under(false, "clickhouse-server is not installed");
}

/// The backend's chdb tests skip on exit code 3 from chdb_check.py; under CI the script must
/// fail instead. `python3 -I -S` hides site-packages, where chdb is installed.
#[test]
fn chdb_check_fails_instead_of_skipping_under_ci() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/chdb_check.py");
    let code = |ci: bool| {
        let mut command = std::process::Command::new("python3");
        command.args(["-I", "-S"]).arg(&script).arg("/nonexistent");
        command.env_remove("CI").stdin(std::process::Stdio::null());
        if ci {
            command.env("CI", "1");
        }
        command.output().expect("python3 runs").status.code()
    };
    assert_eq!(code(false), Some(3), "skips outside CI");
    assert_eq!(code(true), Some(1), "fails under CI");
}
