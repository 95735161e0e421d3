//! `rotate` of a Redis ACL user against a real redis-server: a dotenv file holding the URL and
//! the bare password (the Bitnami chart's `redis-password` shape), and a restart command.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::config::ConfigBuilder;

use support::redis::{connect_url_parts, sha256_hex, user_line, Redis, Sentinel, Users};
use support::rotator::{assert_no_secret, random_password, steps, Rotator};

struct Host {
    redis: Redis,
    rotator: Rotator,
    user: String,
    old: String,
    env_file: PathBuf,
}

fn config(address: &str, user: &str, strategy: &str, command: &[&str], extra: &str) -> String {
    ConfigBuilder::new()
        .redis(address, user)
        .str("strategy", strategy)
        .lines(extra)
        .file_store("LLMTRACE_REDIS_URL", "url")
        .file_store("REDIS_PASSWORD", "password")
        .command_consumer(command)
        .build()
}

impl Host {
    /// A server holding `user` with a random password, the .env with it, and the config.
    async fn start(kind: Users, user: &str, strategy: &str, command: &[&str]) -> Host {
        Self::start_with(kind, user, strategy, command, "", "").await
    }

    async fn start_with(
        kind: Users,
        user: &str,
        strategy: &str,
        command: &[&str],
        redis_extra: &str,
        target_extra: &str,
    ) -> Host {
        let old = random_password();
        let users: Vec<(&str, &str)> = if redis_extra.contains("requirepass") {
            Vec::new()
        } else {
            vec![(user, old.as_str())]
        };
        let redis = Redis::start(kind, &users, &redis_extra.replace("{old}", &old)).await;
        let mut rotator = Rotator::new(&config(
            &redis.address(),
            user,
            strategy,
            command,
            target_extra,
        ));
        rotator
            .env
            .insert("REDIS_ADMIN_PASSWORD".into(), redis.admin_password.clone());
        // The default user is named by leaving it out of the URL, as clients usually do.
        let url_user = if user == "default" { "" } else { user };
        let env_file = rotator.path(".env");
        std::fs::write(
            &env_file,
            format!(
                "# cache\nLLMTRACE_REDIS_URL=redis://{url_user}:{old}@{}/0\nREDIS_PASSWORD={old}\n",
                redis.address()
            ),
        )
        .unwrap();
        Host {
            redis,
            rotator,
            user: user.into(),
            old,
            env_file,
        }
    }

    fn env_text(&self) -> String {
        std::fs::read_to_string(&self.env_file).unwrap()
    }

    /// The password in the URL; asserts the bare-password key holds the same one.
    fn stored(&self) -> String {
        let text = self.env_text();
        let (user, password) = parse_env(&text);
        let bare = text
            .lines()
            .find_map(|l| l.strip_prefix("REDIS_PASSWORD="))
            .unwrap();
        assert_eq!(password, bare, "both stores hold the same password");
        assert_eq!(
            user,
            if self.user == "default" {
                ""
            } else {
                &self.user
            }
        );
        password
    }

    fn assert_clean(&self, output: &str) {
        let new = self.stored();
        let secrets = [
            self.old.as_str(),
            new.as_str(),
            self.redis.admin_password.as_str(),
        ];
        assert_no_secret(output, &secrets, "rotator output at trace level");
        // Nothing the rotator wrote into the server's files is plaintext either.
        assert_no_secret(&self.redis.file("users.acl"), &secrets[1..2], "the aclfile");
        assert_no_secret(&self.redis.file("redis.conf"), &secrets[1..2], "redis.conf");
        assert_no_secret(&self.redis.log(), &secrets, "the Redis log");
    }
}

/// (user, password) from the `LLMTRACE_REDIS_URL` line.
fn parse_env(text: &str) -> (String, String) {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("LLMTRACE_REDIS_URL="))
        .unwrap();
    let url = url::Url::parse(line).unwrap();
    let password = percent_encoding::percent_decode_str(url.password().unwrap())
        .decode_utf8()
        .unwrap()
        .into_owned();
    (url.username().to_string(), password)
}

#[tokio::test(flavor = "multi_thread")]
async fn aclfile_user_dual_rotation_is_saved_and_survives_a_restart() {
    let mut host = Host::start(Users::AclFile, "llmtrace", "dual", &["true"]).await;

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = host.stored();
    assert_ne!(new, host.old);
    assert_eq!(
        host.redis.password_hashes("llmtrace").await,
        [sha256_hex(&new)]
    );
    assert!(host.redis.file("users.acl").contains(&sha256_hex(&new)));
    host.redis.restart().await;
    host.redis
        .try_login("llmtrace", &new)
        .await
        .expect("new password after restart");
    assert!(host.redis.try_login("llmtrace", &host.old).await.is_err());
    host.assert_clean(&out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn config_file_user_single_rotation_is_rewritten_and_survives_a_restart() {
    let mut host = Host::start(Users::ConfigFile, "llmtrace", "single", &["true"]).await;

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = host.stored();
    assert!(host.redis.file("redis.conf").contains(&sha256_hex(&new)));
    host.redis.restart().await;
    assert_eq!(
        host.redis.password_hashes("llmtrace").await,
        [sha256_hex(&new)]
    );
    host.redis
        .try_login("llmtrace", &new)
        .await
        .expect("new password after restart");
    assert!(host.redis.try_login("llmtrace", &host.old).await.is_err());
    host.assert_clean(&out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn default_user_dual_rotation_survives_a_restart() {
    let mut host = Host::start(Users::ConfigFile, "default", "dual", &["true"]).await;

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = host.stored();
    host.redis.restart().await;
    host.redis
        .try_login("default", &new)
        .await
        .expect("new password after restart");
    assert!(host.redis.try_login("default", &host.old).await.is_err());
    // A client that names no user is the default user.
    let mut conn = connect_url_parts("127.0.0.1", host.redis.port, "default", &new)
        .await
        .unwrap();
    redis::cmd("PING")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    host.assert_clean(&out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn default_user_from_requirepass_rotates_and_the_report_says_it_is_not_persisted() {
    let host = Host::start_with(
        Users::ConfigFile,
        "default",
        "single",
        &["true"],
        "requirepass {old}\n",
        "",
    )
    .await;

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout
            .contains("NOT PERSISTED: the default user's password comes from requirepass"),
        "{}",
        out.stdout
    );
    let new = host.stored();
    host.redis
        .try_login("default", &new)
        .await
        .expect("new password");
    assert!(host.redis.try_login("default", &host.old).await.is_err());
    let secrets = [new.as_str(), host.redis.admin_password.as_str()];
    assert_no_secret(&out.all(), &secrets, "rotator output");
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_follows_the_master_through_masterauth() {
    let old = random_password();
    let master = Redis::start(Users::ConfigFile, &[("llmtrace", &old)], "").await;
    let replica = Redis::start_replica(&master, "llmtrace", &old).await;
    assert!(
        replica.wait_link_up(Duration::from_secs(20)).await,
        "{}",
        replica.log()
    );
    let host = Host {
        rotator: Rotator::new(&config(
            &master.address(),
            "llmtrace",
            "single",
            &["true"],
            &format!("replicas = [\"{}\"]", replica.address()),
        )),
        redis: master,
        user: "llmtrace".into(),
        old: old.clone(),
        env_file: PathBuf::new(),
    };
    let mut host = host;
    host.env_file = host.rotator.path(".env");
    host.rotator.env.insert(
        "REDIS_ADMIN_PASSWORD".into(),
        host.redis.admin_password.clone(),
    );
    std::fs::write(
        &host.env_file,
        format!(
            "LLMTRACE_REDIS_URL=redis://llmtrace:{old}@{}/0\nREDIS_PASSWORD={old}\n",
            host.redis.address()
        ),
    )
    .unwrap();

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = host.stored();
    assert_eq!(replica.replication_field("master_link_status").await, "up");
    // Cut the link: the replica can only reconnect with the new password.
    host.redis
        .admin(&["CLIENT", "KILL", "TYPE", "replica"])
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        replica.wait_link_up(Duration::from_secs(20)).await,
        "replica did not reconnect: {}",
        replica.log()
    );
    assert!(
        replica
            .file("redis.conf")
            .contains(&format!("masterauth \"{new}\""))
            || replica
                .file("redis.conf")
                .contains(&format!("masterauth {new}")),
        "masterauth persisted in the replica's config"
    );
    assert_no_secret(
        &out.all(),
        &[
            old.as_str(),
            new.as_str(),
            host.redis.admin_password.as_str(),
        ],
        "rotator output",
    );
}

async fn assert_rolls_back(strategy: &str) {
    let host = Host::start(Users::AclFile, "llmtrace", strategy, &["false"]).await;
    let before = host.env_text();

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back", "{report:#}");
    let steps = steps(&report);
    for expected in [
        "restart failed",
        "undo-publish ok",
        "undo-apply ok",
        "verify-old ok",
    ] {
        assert!(
            steps.contains(&expected.to_string()),
            "{expected} in {steps:?}"
        );
    }
    // dual: the new password is removed only after the consumers rolled out again.
    let position = |step: &str| steps.iter().position(|s| s.starts_with(step)).unwrap();
    assert_eq!(
        position("undo-apply") > position("undo-restart"),
        strategy == "dual",
        "{steps:?}"
    );
    assert_eq!(host.env_text(), before);
    assert_eq!(
        host.redis.password_hashes("llmtrace").await,
        [sha256_hex(&host.old)],
        "only the old password is left"
    );
    assert!(host
        .redis
        .file("users.acl")
        .contains(&sha256_hex(&host.old)));
    host.redis
        .try_login("llmtrace", &host.old)
        .await
        .expect("old password");
    host.assert_clean(&out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_restart_rolls_back_single() {
    assert_rolls_back("single").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_restart_rolls_back_dual_after_the_consumers() {
    assert_rolls_back("dual").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn monitor_sees_no_plaintext_password() {
    let host = Host::start(Users::AclFile, "llmtrace", "dual", &["true"]).await;
    let monitor = host.redis.monitor().await;

    let out = host.rotator.run(&["rotate"]).await;

    let seen = monitor.stop().await;
    assert_eq!(out.code, 0, "{}", out.all());
    // Redis keeps admin commands (ACL, CONFIG) out of MONITOR; what it shows is the logins,
    // with AUTH redacted by the server. The hashes-only property is checked on the files.
    assert!(
        seen.contains("\"AUTH\" \"(redacted)\""),
        "MONITOR saw the rotation: {seen}"
    );
    assert!(seen.contains("\"PING\""), "MONITOR saw the logins: {seen}");
    let new = host.stored();
    assert_no_secret(&seen, &[host.old.as_str(), new.as_str()], "MONITOR output");
    host.assert_clean(&out.all());
}

/// Rotates while a client opens a fresh authenticated connection every ~10 ms with whatever
/// the .env holds at that moment; returns (wall ms, attempts, failed logins).
async fn availability(strategy: &str) -> (u64, usize, usize) {
    let host = Host::start(Users::AclFile, "llmtrace", strategy, &["sleep", "2"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        let env_file = host.env_file.clone();
        let port = host.redis.port;
        tokio::spawn(async move {
            let (mut attempts, mut failures) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let (user, password) = parse_env(&std::fs::read_to_string(&env_file).unwrap());
                attempts += 1;
                let ok = match connect_url_parts("127.0.0.1", port, &user, &password).await {
                    Ok(mut conn) => redis::cmd("PING")
                        .query_async::<()>(&mut conn)
                        .await
                        .is_ok(),
                    Err(_) => false,
                };
                failures += usize::from(!ok);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (attempts, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (attempts, failures) = client.await.unwrap();
    assert_eq!(out.code, 0, "{}", out.all());
    let wall = out.json()["duration_ms"].as_u64().unwrap();
    println!(
        "redis {strategy}: rotation wall time {wall} ms, {attempts} logins, {failures} failed"
    );
    host.assert_clean(&out.all());
    (wall, attempts, failures)
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_rotation_drops_no_login() {
    let (_, attempts, failures) = availability("dual").await;
    assert!(attempts > 100, "the client kept trying: {attempts}");
    assert_eq!(failures, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn single_rotation_failed_logins_are_counted() {
    let (_, attempts, _) = availability("single").await;
    assert!(attempts > 100, "the client kept trying: {attempts}");
}

#[test]
fn user_line_is_a_full_access_rule() {
    assert_eq!(user_line("u", "p"), "user u on >p ~* &* +@all");
}

/// The Bitnami shape: `default` is both the rotated user and the admin, so once the password
/// changed the admin password the rotator was given is stale; undo must still get in.
#[tokio::test(flavor = "multi_thread")]
async fn admin_that_is_the_rotated_user_can_still_roll_back() {
    for (strategy, command) in [("single", "false"), ("single", "true"), ("dual", "false")] {
        let mut host = Host::start(Users::ConfigFile, "default", strategy, &[command]).await;
        let text = std::fs::read_to_string(&host.rotator.config)
            .unwrap()
            .replace(
                "user = \"admin\", password = \"env:REDIS_ADMIN_PASSWORD\"",
                "user = \"default\", password = \"env:OLD_PASSWORD\"",
            );
        host.rotator.write_config(&text);
        host.rotator
            .env
            .insert("OLD_PASSWORD".into(), host.old.clone());

        let out = host.rotator.run(&["rotate"]).await;

        let expected = if command == "true" { 0 } else { 1 };
        assert_eq!(out.code, expected, "{strategy} {command}: {}", out.all());
        let stored = host.stored();
        host.redis
            .try_login("default", &stored)
            .await
            .expect("the stored password logs in");
        assert_eq!(
            host.redis.password_hashes("default").await,
            [sha256_hex(&stored)]
        );
        host.assert_clean(&out.all());
    }
}

/// Killed at every step boundary of a dual rotation, then `recover`: the stored credential
/// logs in, and the user is left with exactly that one password (the other one removed,
/// whichever way the run ended).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn dual_killed_at_every_boundary_then_recovered_keeps_one_password() {
    let host = Host::start(Users::AclFile, "llmtrace", "dual", &["true"]).await;
    let first = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(first.code, 0, "{}", first.all());
    let all: Vec<String> = first.json()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            let name = format!(
                "{}:{}",
                s["step"].as_str().unwrap(),
                s["subject"].as_str().unwrap()
            );
            [format!("{name}:started"), format!("{name}:ok")]
        })
        .collect();
    assert!(all.len() >= 18, "{all:?}");

    for boundary in &all {
        let before = host.stored();
        let crashed = host.rotator.crash_at(boundary).await;
        let out = host.rotator.run(&["recover", "--output", "json"]).await;
        assert_eq!(out.code, 0, "{boundary}: {}", out.all());
        let now = host.stored();
        host.redis
            .try_login("llmtrace", &now)
            .await
            .unwrap_or_else(|e| panic!("{boundary}: {e}"));
        assert_eq!(
            host.redis.password_hashes("llmtrace").await,
            [sha256_hex(&now)],
            "{boundary}: one password left"
        );
        assert!(
            host.redis.file("users.acl").contains(&sha256_hex(&now)),
            "{boundary}: saved"
        );
        assert_no_secret(
            &format!("{crashed}{}", out.all()),
            &[
                before.as_str(),
                now.as_str(),
                host.redis.admin_password.as_str(),
            ],
            boundary,
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_rotation_trusts_the_configured_ca() {
    let old = random_password();
    let (redis, tls_port, ca) = Redis::start_tls(Users::AclFile, &[("llmtrace", &old)]).await;
    let tls_extra = format!("tls = true\nca_file = \"{}\"", ca.display());
    let mut rotator = Rotator::new(&config(
        &format!("127.0.0.1:{tls_port}"),
        "llmtrace",
        "dual",
        &["true"],
        &tls_extra,
    ));
    rotator
        .env
        .insert("REDIS_ADMIN_PASSWORD".into(), redis.admin_password.clone());
    let env_file = rotator.path(".env");
    std::fs::write(
        &env_file,
        format!("LLMTRACE_REDIS_URL=rediss://llmtrace:{old}@127.0.0.1:{tls_port}/0\nREDIS_PASSWORD={old}\n"),
    )
    .unwrap();
    let host = Host {
        redis,
        rotator,
        user: "llmtrace".into(),
        old,
        env_file,
    };

    let out = host.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = host.stored();
    assert_eq!(
        host.redis.password_hashes("llmtrace").await,
        [sha256_hex(&new)]
    );
    host.assert_clean(&out.all());

    // Without the CA the server's certificate is not trusted: refused at preflight.
    host.rotator.write_config(&config(
        &format!("127.0.0.1:{tls_port}"),
        "llmtrace",
        "dual",
        &["true"],
        "tls = true",
    ));
    let refused = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(refused.code, 1, "{}", refused.all());
    assert_eq!(refused.json()["outcome"], "refused");
}

/// A master and two replicas as the Bitnami chart runs them: every node defines `llmtrace`
/// with the same password, and the replicas authenticate to the master as it. ACLs are per
/// server and `ACL SETUSER` is not propagated to replicas (redis src/acl.c `aclCommand`;
/// src/commands/acl-setuser.json has no WRITE flag, so src/server.c `call` does not replicate
/// it), which is why each listed replica is changed on its own.
struct Replicated {
    master: Redis,
    replicas: Vec<Redis>,
    rotator: Rotator,
    old: String,
}

impl Replicated {
    async fn start(strategy: &str, command: &[&str]) -> Replicated {
        let old = random_password();
        let users = [("llmtrace", old.as_str())];
        let master = Redis::start(Users::ConfigFile, &users, "").await;
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let replica = Redis::start_replica_with_users(&master, &users, "llmtrace", &old).await;
            assert!(
                replica.wait_link_up(Duration::from_secs(20)).await,
                "{}",
                replica.log()
            );
            replicas.push(replica);
        }
        let listed = replicas
            .iter()
            .map(|r| format!("{:?}", r.address()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut rotator = Rotator::new(&config(
            &master.address(),
            "llmtrace",
            strategy,
            command,
            &format!("replicas = [{listed}]"),
        ));
        rotator
            .env
            .insert("REDIS_ADMIN_PASSWORD".into(), master.admin_password.clone());
        std::fs::write(
            rotator.path(".env"),
            format!(
                "LLMTRACE_REDIS_URL=redis://llmtrace:{old}@{}/0\nREDIS_PASSWORD={old}\n",
                master.address()
            ),
        )
        .unwrap();
        std::fs::write(rotator.path("old.txt"), &old).unwrap();
        Replicated {
            master,
            replicas,
            rotator,
            old,
        }
    }

    fn nodes(&self) -> Vec<&Redis> {
        std::iter::once(&self.master)
            .chain(&self.replicas)
            .collect()
    }

    fn stored(&self) -> String {
        let text = std::fs::read_to_string(self.rotator.path(".env")).unwrap();
        parse_env(&text).1
    }

    /// Every node holds exactly `password` for llmtrace, and only it logs in.
    async fn assert_only(&self, password: &str, other: &str) {
        for node in self.nodes() {
            assert_eq!(
                node.password_hashes("llmtrace").await,
                [sha256_hex(password)],
                "{}",
                node.address()
            );
            node.try_login("llmtrace", password)
                .await
                .expect("the password logs in");
            assert!(node.try_login("llmtrace", other).await.is_err());
        }
    }

    /// Each replica's link to the master comes back up after it is cut: masterauth follows.
    async fn assert_links_recover(&self) {
        self.master
            .admin(&["CLIENT", "KILL", "TYPE", "replica"])
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for replica in &self.replicas {
            assert!(
                replica.wait_link_up(Duration::from_secs(20)).await,
                "replica did not reconnect: {}",
                replica.log()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn single_rotation_changes_every_replica_and_persists_it() {
    let set = Replicated::start("single", &["true"]).await;

    let out = set.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = set.stored();
    set.assert_only(&new, &set.old).await;
    for replica in &set.replicas {
        // CONFIG REWRITE wrote the user line with the new hash (redis src/config.c
        // `rewriteConfigUserOption`), so a restart keeps it.
        let conf = replica.file("redis.conf");
        assert!(conf.contains(&sha256_hex(&new)), "{conf}");
        assert!(!conf.contains(&set.old), "{conf}");
    }
    set.assert_links_recover().await;
    assert_no_secret(
        &out.all(),
        &[&set.old, &new, &set.master.admin_password],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_rotation_lets_both_passwords_in_on_every_node_until_retire() {
    // While the consumer restarts, it tries both passwords on all three nodes (the ports are
    // only known once they run, so the config is written again with them).
    let set = Replicated::start("dual", &["true"]).await;
    let ports = set
        .nodes()
        .iter()
        .map(|n| n.port.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        "new=$(sed -n 's/^REDIS_PASSWORD=//p' .env); old=$(cat old.txt); \
         for port in {ports}; do for pw in \"$old\" \"$new\"; do \
         redis-cli -p $port --user llmtrace --pass \"$pw\" --no-auth-warning ping >> checks.log 2>&1; \
         done; done"
    );
    let text = std::fs::read_to_string(&set.rotator.config)
        .unwrap()
        .replace(
            r#"command = ["true"]"#,
            &format!("command = [\"sh\", \"-c\", {script:?}]"),
        );
    set.rotator.write_config(&text);

    let out = set.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let checks = std::fs::read_to_string(set.rotator.path("checks.log")).unwrap();
    assert_eq!(checks.matches("PONG").count(), 6, "{checks}");
    let new = set.stored();
    set.assert_only(&new, &set.old).await;
    set.assert_links_recover().await;
    assert_no_secret(&out.all(), &[&set.old, &new], "rotator output");
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_puts_the_old_password_back_on_every_replica() {
    for strategy in ["single", "dual"] {
        let seen = tempfile::NamedTempFile::new().unwrap();
        let command = format!("cat .env >> {}; false", seen.path().display());
        let set = Replicated::start(strategy, &["sh", "-c", &command]).await;

        let out = set.rotator.run(&["rotate", "--output", "json"]).await;

        assert_eq!(out.code, 1, "{strategy}: {}", out.all());
        assert_eq!(out.json()["outcome"], "rolled_back", "{strategy}");
        let rolled_out = parse_env(&std::fs::read_to_string(seen.path()).unwrap()).1;
        assert_ne!(rolled_out, set.old);
        set.assert_only(&set.old, &rolled_out).await;
        set.assert_links_recover().await;
    }
}

/// With `sentinel = { address, master_name }` the master and its replicas are found through
/// Sentinel (`SENTINEL GET-MASTER-ADDR-BY-NAME`, `SENTINEL REPLICAS`; redis src/sentinel.c
/// `sentinelCommand`) instead of being listed, and every one of them is changed.
#[tokio::test(flavor = "multi_thread")]
async fn sentinel_discovers_the_master_and_replicas_and_every_node_is_rotated() {
    let set = Replicated::start("single", &["true"]).await;
    let sentinel = Sentinel::start(&set.master, 2).await;
    let text = std::fs::read_to_string(&set.rotator.config).unwrap();
    let start = text.find("address = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let start = text.find("replicas = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    let text = format!(
        "{}sentinel = {{ address = \"{}\", master_name = \"mymaster\" }}{}",
        &text[..start],
        sentinel.address(),
        &text[end..]
    );
    set.rotator.write_config(&text);

    let out = set.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = set.stored();
    set.assert_only(&new, &set.old).await;
    set.assert_links_recover().await;
    // The config named neither the master nor the replicas.
    assert!(!text.contains(&set.master.address()), "{text}");
    assert_no_secret(
        &out.all(),
        &[&set.old, &new, &set.master.admin_password],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dual_keeps_the_old_password_while_a_connection_on_it_stays_open_and_retires_it_next_time()
{
    let host = Host::start_with(
        Users::AclFile,
        "llmtrace",
        "dual",
        &["true"],
        "",
        "confirm_timeout = \"2s\"",
    )
    .await;
    // A client that authenticated with the old password and keeps its connection.
    let mut held = support::redis::try_connect(host.redis.port, "llmtrace", &host.old)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut held)
        .await
        .unwrap();

    let out = host.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "succeeded");
    let confirm = &report["confirm"][0];
    assert_eq!(
        (
            &confirm["drained"],
            &confirm["old_sessions"],
            &confirm["retire_skipped"]
        ),
        (
            &serde_json::json!(false),
            &serde_json::json!(1),
            &serde_json::json!(true)
        ),
        "{confirm}"
    );
    assert!(
        steps(&report).contains(&"confirm warning".to_string()),
        "{report}"
    );
    assert!(
        steps(&report).contains(&"retire skipped".to_string()),
        "{report}"
    );
    assert!(
        report["state"].as_array().unwrap().iter().any(|l| l
            .as_str()
            .unwrap()
            .contains("both log in until a later run retires")),
        "{report}"
    );
    let first = host.stored();
    host.redis
        .try_login("llmtrace", &host.old)
        .await
        .expect("old kept");
    host.redis
        .try_login("llmtrace", &first)
        .await
        .expect("new works");
    assert_eq!(host.redis.password_hashes("llmtrace").await.len(), 2);
    host.assert_clean(&out.all());

    // The connection closes; the next run drains and retires both older passwords.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(again.code, 0, "{}", again.all());
    assert_eq!(
        again.json()["confirm"][0]["drained"],
        true,
        "{}",
        again.stdout
    );
    let second = host.stored();
    assert_eq!(
        host.redis.password_hashes("llmtrace").await,
        [sha256_hex(&second)]
    );
    for gone in [&host.old, &first] {
        assert!(host.redis.try_login("llmtrace", gone).await.is_err());
    }
    // Saved to the aclfile too: a restart keeps only the newest.
    assert!(!host
        .redis
        .file("users.acl")
        .contains(&sha256_hex(&host.old)));
    assert!(!host.redis.file("users.acl").contains(&sha256_hex(&first)));
}
