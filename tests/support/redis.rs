//! A throwaway redis-server for tests: a generated config file in a temp dir, a free loopback
//! port, users either in an aclfile or in the config file, and an `admin` user for the rotator.
//! Dropping the value kills the server and removes the temp dir.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ADMIN_USER: &str = "admin";

/// Where the server keeps its users.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Users {
    /// `aclfile users.acl`: persisted by `ACL SAVE`.
    AclFile,
    /// `user ...` lines in redis.conf: persisted by `CONFIG REWRITE`.
    ConfigFile,
}

pub struct Redis {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub conf: PathBuf,
    pub admin_password: String,
    child: Option<Child>,
    /// The throwaway CA and server certificate of a TLS server, removed with it.
    pki: Option<tempfile::TempDir>,
}

/// `user NAME on >PASSWORD ~* &* +@all`: the rule line for a full-access user.
pub fn user_line(user: &str, password: &str) -> String {
    format!("user {user} on >{password} ~* &* +@all")
}

pub fn sha256_hex(password: &str) -> String {
    Sha256::digest(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Redis {
    /// Starts a server whose users are `users` (NAME, PASSWORD) plus `admin`; `extra` is appended
    /// to redis.conf (e.g. `requirepass`, `replicaof`).
    pub async fn start(kind: Users, users: &[(&str, &str)], extra: &str) -> Redis {
        Self::start_with_admin(kind, users, extra, super::rotator::random_password()).await
    }

    async fn start_with_admin(
        kind: Users,
        users: &[(&str, &str)],
        extra: &str,
        admin_password: String,
    ) -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut lines: Vec<String> = users.iter().map(|(u, p)| user_line(u, p)).collect();
        lines.push(user_line(ADMIN_USER, &admin_password));
        let mut conf = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsave \"\"\nappendonly no\nlogfile {}\n",
            dir.path().display(),
            dir.path().join("redis.log").display()
        );
        match kind {
            Users::AclFile => {
                let acl = dir.path().join("users.acl");
                std::fs::write(&acl, lines.join("\n") + "\n").unwrap();
                conf.push_str(&format!("aclfile {}\n", acl.display()));
            }
            Users::ConfigFile => conf.push_str(&(lines.join("\n") + "\n")),
        }
        conf.push_str(extra);
        let conf_path = dir.path().join("redis.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut redis = Redis {
            dir,
            port,
            conf: conf_path,
            admin_password,
            child: None,
            pki: None,
        };
        redis.spawn().await;
        redis
    }

    /// A replica of `master` that authenticates as `masteruser` with `masterauth`; users in its
    /// config file, with the same admin password as the master.
    pub async fn start_replica(master: &Redis, masteruser: &str, masterauth: &str) -> Redis {
        Redis::start_replica_with_users(master, &[], masteruser, masterauth).await
    }

    /// [`Redis::start_replica`] with `users` defined on the replica too, as the Bitnami chart
    /// starts every replica with the master's password.
    pub async fn start_replica_with_users(
        master: &Redis,
        users: &[(&str, &str)],
        masteruser: &str,
        masterauth: &str,
    ) -> Redis {
        let extra = format!(
            "replicaof 127.0.0.1 {}\nmasteruser {masteruser}\nmasterauth {masterauth}\n",
            master.port
        );
        // Same admin on both, as the rotator's single admin credential expects.
        Redis::start_with_admin(
            Users::ConfigFile,
            users,
            &extra,
            master.admin_password.clone(),
        )
        .await
    }

    /// Like [`Redis::start`], also listening with TLS on another port, with a certificate for
    /// 127.0.0.1 from a throwaway CA. Returns the TLS port and the CA file.
    pub async fn start_tls(kind: Users, users: &[(&str, &str)]) -> (Redis, u16, PathBuf) {
        let certs = super::pki::Pki::new("IP:127.0.0.1");
        let pki = certs.dir.path().to_path_buf();
        let tls_port = free_port();
        let extra = format!(
            "tls-port {tls_port}\ntls-cert-file {0}/server.crt\ntls-key-file {0}/server.key\ntls-ca-cert-file {0}/ca.crt\ntls-auth-clients no\n",
            pki.display()
        );
        let mut redis = Redis::start(kind, users, &extra).await;
        redis.pki = Some(certs.dir);
        (redis, tls_port, pki.join("ca.crt"))
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if try_connect(self.port, ADMIN_USER, &self.admin_password)
                .await
                .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server and starts it again from its files: what survives was persisted.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    pub async fn try_login(&self, user: &str, password: &str) -> Result<(), String> {
        let mut conn = try_connect(self.port, user, password).await?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs a command as admin and returns its reply.
    pub async fn admin(&self, args: &[&str]) -> redis::Value {
        let mut conn = try_connect(self.port, ADMIN_USER, &self.admin_password)
            .await
            .unwrap();
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", args[0]))
    }

    async fn admin_text(&self, args: &[&str]) -> String {
        match self.admin(args).await {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => format!("{other:?}"),
        }
    }

    /// The SHA-256 hashes `user` accepts, as `ACL GETUSER` lists them.
    pub async fn password_hashes(&self, user: &str) -> Vec<String> {
        let redis::Value::Array(fields) = self.admin(&["ACL", "GETUSER", user]).await else {
            panic!("ACL GETUSER {user}: not an array");
        };
        let position = fields
            .iter()
            .position(|v| matches!(v, redis::Value::BulkString(b) if b == b"passwords"))
            .unwrap();
        let redis::Value::Array(hashes) = &fields[position + 1] else {
            panic!("passwords is not an array");
        };
        hashes
            .iter()
            .map(|v| match v {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    pub async fn replication_field(&self, field: &str) -> String {
        let info = self.admin_text(&["INFO", "replication"]).await;
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or("")
            .trim()
            .to_string()
    }

    pub async fn wait_link_up(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.replication_field("master_link_status").await == "up" {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Starts a `MONITOR` client; [`Monitor::stop`] returns everything it saw.
    pub async fn monitor(&self) -> Monitor {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let auth = format!(
            "*3\r\n$4\r\nAUTH\r\n${}\r\n{ADMIN_USER}\r\n${}\r\n{}\r\n*1\r\n$7\r\nMONITOR\r\n",
            ADMIN_USER.len(),
            self.admin_password.len(),
            self.admin_password
        );
        stream.write_all(auth.as_bytes()).await.unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    n = stream.read(&mut buf) => match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    },
                }
            }
            String::from_utf8_lossy(&seen).into_owned()
        });
        Monitor { stop, task }
    }
}

pub struct Monitor {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<String>,
}

impl Monitor {
    pub async fn stop(self) -> String {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn try_connect(
    port: u16,
    user: &str,
    password: &str,
) -> Result<MultiplexedConnection, String> {
    connect_url_parts("127.0.0.1", port, user, password).await
}

pub async fn connect_url_parts(
    host: &str,
    port: u16,
    user: &str,
    password: &str,
) -> Result<MultiplexedConnection, String> {
    let info = ConnectionAddr::Tcp(host.to_string(), port)
        .into_connection_info()
        .map_err(|e| e.to_string())?
        .set_redis_settings(
            RedisConnectionInfo::default()
                .set_username(user)
                .set_password(password)
                .set_skip_set_lib_name(),
        );
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    Client::open(info)
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A Redis Sentinel monitoring `master` as `mymaster` (quorum 1), authenticating to it as the
/// admin user, and knowing that user itself (Sentinel takes `user` lines since 6.2).
pub struct Sentinel {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Sentinel {
    pub async fn start(master: &Redis, replicas: usize) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel.log\n{admin}\n\
                 sentinel monitor mymaster 127.0.0.1 {master} 1\n\
                 sentinel auth-user mymaster {ADMIN_USER}\n\
                 sentinel auth-pass mymaster {password}\n\
                 sentinel down-after-milliseconds mymaster 60000\n",
                dir = dir.path().display(),
                admin = user_line(ADMIN_USER, &master.admin_password),
                master = master.port,
                password = master.admin_password,
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel runs");
        let sentinel = Sentinel { dir, port, child };
        // Sentinel learns the replicas from the master's INFO (redis src/sentinel.c
        // `sentinelRefreshInstanceInfo`): wait until it lists them all.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut conn) = try_connect(port, ADMIN_USER, &master.admin_password).await {
                let listed: Result<redis::Value, _> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg("mymaster")
                    .query_async(&mut conn)
                    .await;
                if let Ok(redis::Value::Array(items)) = listed {
                    if items.len() == replicas {
                        return sentinel;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "sentinel did not list {replicas} replicas:\n{}",
                std::fs::read_to_string(sentinel.dir.path().join("sentinel.log"))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
