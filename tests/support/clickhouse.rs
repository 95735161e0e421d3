//! A throwaway clickhouse-server (Debian's 18.16) for tests: a generated config.xml and
//! users.xml in a temp dir, HTTP and native ports the OS hands out, its users.d beside
//! users.xml. Dropping the value kills the server and removes the temp dir.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ClickHouse {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    /// The `default` user's password (an admin, as far as 18.16 has one).
    pub admin_password: String,
    child: Child,
}

/// The server binary; `None` where apt has no clickhouse-server (scripts/test.sh treats it
/// as optional), and the ClickHouse tests then skip, saying so; under CI they fail instead.
pub fn program() -> Option<&'static str> {
    let found = ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file());
    if found.is_none() {
        super::skip("clickhouse-server is not installed (apt-get install clickhouse-server)");
    }
    found
}

impl ClickHouse {
    /// Starts a server with `user` defined in users.xml by a plaintext `<password>` (the
    /// users.d file must drop it), and a `default` user with [`ClickHouse::admin_password`].
    pub async fn start(user: &str, password: &str) -> Option<ClickHouse> {
        ClickHouse::start_users(&[(user, password, "default")]).await
    }

    /// Like [`ClickHouse::start`], for several users given as (name, password, profile); the
    /// profiles `default` and `readonly` exist.
    pub async fn start_users(users: &[(&str, &str, &str)]) -> Option<ClickHouse> {
        let program = program()?;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let defined: String = users
            .iter()
            .map(|(user, password, profile)| {
                format!(
                    "        <{user}><password>{password}</password><networks><ip>127.0.0.1</ip></networks><profile>{profile}</profile><quota>default</quota></{user}>\n"
                )
            })
            .collect();
        let http_port = free_port();
        let tcp_port = free_port();
        let admin_password = super::rotator::random_password();
        std::fs::create_dir_all(root.join("users.d")).unwrap();
        std::fs::write(
            root.join("config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <logger><level>trace</level><log>{root}/server.log</log><errorlog>{root}/error.log</errorlog><console>0</console></logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>5368709</mark_cache_size>
    <uncompressed_cache_size>8589934</uncompressed_cache_size>
</yandex>
"#,
                root = root.display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("users.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <profiles><default></default><readonly><readonly>1</readonly></readonly></profiles>
    <quotas><default></default></quotas>
    <users>
        <default><password>{admin_password}</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default>
{defined}    </users>
</yandex>
"#
            ),
        )
        .unwrap();
        let child = Command::new(program)
            .arg(format!(
                "--config-file={}",
                root.join("config.xml").display()
            ))
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clickhouse-server starts");
        let server = ClickHouse {
            dir,
            http_port,
            admin_password,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server
            .try_login("default", &server.admin_password)
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "clickhouse-server did not start:\n{}",
                server.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Some(server)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    pub fn users_d(&self) -> PathBuf {
        self.dir.path().join("users.d")
    }

    /// `SELECT 1` as `user`, the password in a header as the rotator does it.
    pub async fn try_login(&self, user: &str, password: &str) -> Result<(), String> {
        let response = reqwest::Client::new()
            .get(format!("http://{}/?query=SELECT%201", self.address()))
            .header("X-ClickHouse-User", user)
            .header("X-ClickHouse-Key", password)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if status.is_success() && body.trim() == "1" {
            Ok(())
        } else {
            Err(format!("HTTP {status}"))
        }
    }

    /// Both server logs.
    pub fn logs(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}\n{}", read("server.log"), read("error.log"))
    }

    /// Every file under the server's directory that the rotator or the server wrote, except
    /// users.xml (the test wrote the initial plaintext password there).
    pub fn files_text(&self) -> String {
        let mut out = String::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.file_name().is_some_and(|n| n != "users.xml") {
                    if let Ok(bytes) = std::fs::read(&path) {
                        out.push_str(&String::from_utf8_lossy(&bytes));
                    }
                }
            }
        }
        out
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}
