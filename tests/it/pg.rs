//! The tests' own PostgreSQL server: `initdb` into a temporary directory,
//! `postgres` on a free port of 127.0.0.1 only (run as `nobody` when the
//! tests run as root, as PostgreSQL refuses root), one database per test,
//! stopped and removed when the test binary ends (a watcher polls for it).
//!
//! The suite runs on it with `TOKENWARDEN_TEST_STORE=postgres`
//! (`scripts/test` runs the integration tests both ways).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub struct Server {
    pub port: u16,
    bin: PathBuf,
    /// Runs PostgreSQL's tools as this user (root's tests only).
    user: Option<(u32, u32)>,
    pub dir: PathBuf,
    /// Stops the server once the tests' process is gone (it outlives us).
    _watcher: Option<std::process::Child>,
}

/// A client of the database at `url` (a test's own look at the ledger).
#[allow(dead_code)]
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(connection);
    client
}

/// Whether the integration tests run on PostgreSQL.
pub fn selected() -> bool {
    std::env::var("TOKENWARDEN_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// The server, started on first use.
pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start("shared"))
}

/// A server of a test's own (one that stops and starts it).
#[allow(dead_code)]
pub fn own_server(label: &str) -> Server {
    start(label)
}

/// The directory of PostgreSQL's programs: `TOKENWARDEN_PG_BIN`, or the
/// newest of Debian's /usr/lib/postgresql/*/bin.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TOKENWARDEN_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .filter(|(_, bin)| bin.join("postgres").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| panic!("no PostgreSQL server: scripts/test installs Debian's postgresql (or set TOKENWARDEN_PG_BIN)"))
}

/// `nobody`'s uid and gid, when the tests run as root.
fn unprivileged() -> Option<(u32, u32)> {
    let uid = String::from_utf8(Command::new("id").arg("-u").output().ok()?.stdout).ok()?;
    if uid.trim() != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("nobody:"))?;
    let mut fields = line.split(':').skip(2);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

impl Server {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.user {
            std::os::unix::process::CommandExt::uid(&mut c, uid);
            std::os::unix::process::CommandExt::gid(&mut c, gid);
        }
        c
    }

    /// The database of the ledger in `dir`.
    fn name(dir: &Path) -> String {
        let name: String = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("db")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("tw_{}", &name[name.len().saturating_sub(50)..])
    }

    /// Run a client program (`createdb`, `pg_dump`) on `database`.
    fn client_tool(&self, program: &str, database: &str) -> std::process::Output {
        let out = self
            .command(program)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                database,
            ])
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        out
    }

    /// A database of its own for the ledger in `dir` (made on first use);
    /// returns its URL.
    pub fn database(&self, dir: &Path) -> String {
        let name = Self::name(dir);
        let out = self.client_tool("createdb", &name);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("already exists"),
            "createdb {name}: {err}"
        );
        self.url(&name)
    }

    /// Everything the ledger in `dir` holds, as `pg_dump` writes it.
    pub fn dump(&self, dir: &Path) -> Vec<u8> {
        let out = self.client_tool("pg_dump", &Self::name(dir));
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Stop the server (fast shutdown) (tests/replicas.rs).
    #[allow(dead_code)]
    pub fn stop(&self) {
        self.ctl(&["stop", "-m", "fast", "-w"]);
    }

    /// Start the server on its port and data.
    pub fn start(&self) {
        self.ctl(&[
            "start",
            "-w",
            "-t",
            "30",
            "-l",
            &self.dir.join("log").display().to_string(),
            "-o",
            &self.options(),
        ]);
    }

    fn options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            self.port,
            self.dir.display()
        )
    }

    fn ctl(&self, args: &[&str]) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("pg_ctl: {e}"));
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn start(label: &str) -> Server {
    let bin = bin_dir();
    let user = unprivileged();
    let dir = std::env::temp_dir().join(format!("tokenwarden-pg-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut server = Server {
        port: 0,
        bin,
        user,
        dir,
        _watcher: None,
    };
    let out = server
        .command("initdb")
        .arg("-D")
        .arg(server.dir.join("data"))
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .unwrap_or_else(|e| panic!("initdb: {e}"));
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A free port (bound and released: PostgreSQL binds its own socket).
    server.port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    server.start();
    // Stopped and removed once this test process has gone.
    let watcher = format!(
        "while [ -d /proc/{pid} ]; do sleep 0.5; done; \"$0\" -D \"$1\" stop -m immediate >/dev/null 2>&1; rm -rf \"$2\"",
        pid = std::process::id()
    );
    let mut watch = Command::new("sh");
    watch
        .arg("-c")
        .arg(watcher)
        .arg(server.bin.join("pg_ctl"))
        .arg(server.dir.join("data"))
        .arg(&server.dir);
    if let Some((uid, gid)) = user {
        std::os::unix::process::CommandExt::uid(&mut watch, uid);
        std::os::unix::process::CommandExt::gid(&mut watch, gid);
    }
    let watcher = watch
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("the server's watcher: {e}"));
    server._watcher = Some(watcher);
    server
}
