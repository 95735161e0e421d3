//! Rotating the admin credential itself: a target whose `user` is its own admin (`postgres`).
//! Apply runs `ALTER ROLE postgres PASSWORD ...` on a session opened with the current password
//! (PostgreSQL authenticates only when a session starts, src/backend/libpq/auth.c
//! `ClientAuthentication`; a superuser may change its own password, src/backend/commands/user.c
//! `AlterRole`); every later admin session, the rollback's included, must use the password in
//! force then, even when the admin reference was read before the change.

use std::time::Duration;
use support::config::{quoted, ConfigBuilder};

use support::kube_fake::Rollout;
use support::postgres::Postgres;
use support::rotator::{assert_no_secret, LlmtraceCluster, Rotator, NS};

/// The `postgres-admin` target: the admin `postgres` rotating itself.
fn admin_target(address: &str, admin_password: &str) -> ConfigBuilder {
    ConfigBuilder::new()
        .postgres(address)
        .str("name", "postgres-admin")
        .str("database", "postgres")
        .str("user", "postgres")
        .set(
            "admin",
            format!(
                "{{ user = \"postgres\", password = {} }}",
                quoted(admin_password)
            ),
        )
}

fn kubernetes_config(address: &str) -> String {
    admin_target(
        address,
        "k8s:llmtrace/llmtrace-postgresql#postgres-password",
    )
    .kubernetes_store("llmtrace-postgresql", "postgres-password", "password")
    .deployment_consumer("3s")
    .build()
}

fn admin_in_secret(cluster: &LlmtraceCluster) -> String {
    cluster.kube.secret(NS, "llmtrace-postgresql").unwrap()["postgres-password"].clone()
}

async fn kube_cluster(rollout: Rollout) -> LlmtraceCluster {
    let cluster = LlmtraceCluster::start(rollout).await;
    cluster
        .rotator
        .write_config(&kubernetes_config(&cluster.pg.address()));
    cluster
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_password_in_the_secret_it_rotates_rotates_twice() {
    let cluster = kube_cluster(Rollout::ReadyAfter(Duration::from_millis(200))).await;
    let original = cluster.pg.admin_password().to_string();

    let first = cluster.rotator.run(&["rotate"]).await;
    assert_eq!(first.code, 0, "{}", first.all());
    let new_1 = admin_in_secret(&cluster);
    assert_ne!(new_1, original);
    cluster
        .pg
        .try_login("postgres", &new_1, "postgres")
        .await
        .expect("the new admin password");
    assert!(cluster
        .pg
        .try_login("postgres", &original, "postgres")
        .await
        .is_err());

    // The reference is read again at the next run: it now holds the rotated password.
    let second = cluster.rotator.run(&["rotate"]).await;
    assert_eq!(second.code, 0, "{}", second.all());
    let new_2 = admin_in_secret(&cluster);
    assert_ne!(new_2, new_1);
    cluster
        .pg
        .try_login("postgres", &new_2, "postgres")
        .await
        .expect("the newer admin password");
    assert_no_secret(
        &format!("{}{}", first.all(), second.all()),
        &[&original, &new_1, &new_2],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_after_the_admin_changed_its_own_password_restores_it() {
    // The rollout never finishes: the run rolls back after apply and publish, when the admin
    // reference read at the start (the old password) no longer logs in.
    let cluster = kube_cluster(Rollout::Stuck {
        deadline: Duration::from_secs(1),
    })
    .await;
    let original = cluster.pg.admin_password().to_string();

    let out = cluster.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "rolled_back", "{}", out.all());
    assert_eq!(admin_in_secret(&cluster), original);
    cluster
        .pg
        .try_login("postgres", &original, "postgres")
        .await
        .expect("the original admin password is back");
    assert_no_secret(&out.all(), &[&original], "rotator output");
}

/// A dotenv store and an admin reference (`env:`) that still holds the first password: from
/// the second run on, only the stored credential logs the admin in.
struct FileHost {
    pg: Postgres,
    rotator: Rotator,
}

impl FileHost {
    async fn start(command: &str) -> FileHost {
        let pg = Postgres::start().await;
        let mut rotator = Rotator::new(
            &admin_target(&pg.address(), "env:PG_ADMIN_PASSWORD")
                .file_store("DATABASE_URL", "url")
                .file_store("POSTGRES_PASSWORD", "password")
                .command_consumer(&["sh", "-c", command])
                .build(),
        );
        rotator
            .env
            .insert("PG_ADMIN_PASSWORD".into(), pg.admin_password().to_string());
        std::fs::write(
            rotator.path(".env"),
            format!(
                "DATABASE_URL={}?sslmode=disable\nPOSTGRES_PASSWORD={}\n",
                pg.url("postgres", pg.admin_password(), "postgres"),
                pg.admin_password()
            ),
        )
        .unwrap();
        FileHost { pg, rotator }
    }

    fn stored(&self) -> String {
        let text = std::fs::read_to_string(self.rotator.path(".env")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("POSTGRES_PASSWORD="))
            .unwrap()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_file_store_the_admin_rotates_again_and_rolls_back_with_a_stale_reference() {
    let host = FileHost::start("exit $(cat fail 2>/dev/null || echo 0)").await;
    let original = host.pg.admin_password().to_string();

    let first = host.rotator.run(&["rotate"]).await;
    assert_eq!(first.code, 0, "{}", first.all());
    let new_1 = host.stored();
    assert_ne!(new_1, original);

    // PG_ADMIN_PASSWORD still holds `original`, which no longer logs in.
    let second = host.rotator.run(&["rotate"]).await;
    assert_eq!(second.code, 0, "{}", second.all());
    let new_2 = host.stored();
    assert_ne!(new_2, new_1);
    host.pg
        .try_login("postgres", &new_2, "postgres")
        .await
        .expect("the newer admin password");

    // Now the consumer fails: the rollback's admin session needs the password apply set.
    std::fs::write(host.rotator.path("fail"), "1").unwrap();
    let third = host.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(third.code, 1, "{}", third.all());
    assert_eq!(third.json()["outcome"], "rolled_back", "{}", third.all());
    assert_eq!(host.stored(), new_2);
    host.pg
        .try_login("postgres", &new_2, "postgres")
        .await
        .expect("the stored admin password logs in again");
    assert!(host
        .pg
        .try_login("postgres", &original, "postgres")
        .await
        .is_err());
    assert_no_secret(
        &format!("{}{}{}", first.all(), second.all(), third.all()),
        &[&original, &new_1, &new_2],
        "rotator output",
    );
}

/// The Bitnami Redis shape: `default` is both the rotated user and the admin, its password in
/// `<release>-redis#redis-password`, which the target rotates. After apply, the password read
/// from that Secret at the start no longer authenticates (redis src/acl.c
/// `ACLCheckUserCredentials`); the rollback must use the new one to put the old one back.
#[tokio::test(flavor = "multi_thread")]
async fn redis_default_user_as_its_own_admin_rotates_and_rolls_back_through_its_secret() {
    use support::kube_fake::KubeFake;
    use support::redis::{Redis, Users};

    for (rollout, expected) in [
        (Rollout::ReadyAfter(Duration::from_millis(200)), 0),
        (
            Rollout::Stuck {
                deadline: Duration::from_secs(1),
            },
            1,
        ),
    ] {
        let old = support::rotator::random_password();
        let redis = Redis::start(Users::ConfigFile, &[("default", &old)], "").await;
        let kube = KubeFake::start().await;
        kube.put_secret(NS, "llmtrace-redis", &[("redis-password", &old)]);
        kube.add_deployment(NS, "llmtrace", 1, rollout);
        let mut rotator = Rotator::new(
            &ConfigBuilder::new()
                .redis(&redis.address(), "default")
                .set(
                    "admin",
                    "{ user = \"default\", password = \"k8s:llmtrace/llmtrace-redis#redis-password\" }",
                )
                .kubernetes_store("llmtrace-redis", "redis-password", "password")
                .deployment_consumer("3s")
                .build(),
        );
        let kubeconfig = kube.write_kubeconfig(rotator.dir.path());
        rotator
            .env
            .insert("KUBECONFIG".into(), kubeconfig.display().to_string());

        let out = rotator.run(&["rotate"]).await;

        assert_eq!(out.code, expected, "{}", out.all());
        let stored = kube.secret(NS, "llmtrace-redis").unwrap()["redis-password"].clone();
        redis
            .try_login("default", &stored)
            .await
            .expect("the stored password logs in");
        if expected == 0 {
            assert_ne!(stored, old);
            assert!(redis.try_login("default", &old).await.is_err());
        } else {
            assert_eq!(stored, old, "rolled back");
        }
        assert_no_secret(&out.all(), &[&old, &stored], "rotator output");
    }
}
