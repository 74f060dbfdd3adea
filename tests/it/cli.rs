//! The `tokenwarden count` command, run as a user runs it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn tokenwarden: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or_default())
            .unwrap_or_else(|e| panic!("stdin: {e}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait: {e}"))
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn seed_example() {
    let out = run(
        &[
            "count",
            "--model",
            "gpt-4o",
            "You miss 100% of the shots you don't take",
        ],
        None,
    );
    assert_eq!(stdout(&out), "11\n");
}

#[test]
fn reads_stdin_and_defaults_to_gpt_4o() {
    let out = run(
        &["count"],
        Some("You miss 100% of the shots you don't take".as_bytes()),
    );
    assert_eq!(stdout(&out), "11\n");
    // cl100k_base counts the same text differently than o200k_base.
    let a = stdout(&run(
        &["count", "--model", "gpt-4", "naïve café 中文"],
        None,
    ));
    let b = stdout(&run(
        &["count", "--model", "gpt-4o", "naïve café 中文"],
        None,
    ));
    assert_ne!(a, b);
}

#[test]
fn json_details() {
    let out = stdout(&run(
        &["count", "--json", "--model", "gpt-4o-mini", "hello world"],
        None,
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["tokens"], 2);
    assert_eq!(v["encoding"], "o200k_base");
    assert_eq!(v["group"], "mini");
    assert_eq!(v["exactness"], "exact");
    // 2 tokens at $0.15 per million.
    assert_eq!(v["list_price_usd"], "$0.000000300000");
}

#[test]
fn counts_a_request_body() {
    let body = br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 100}"#;
    let out = stdout(&run(&["count", "--request", "-", "--json"], Some(body)));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["endpoint"], "/v1/chat/completions");
    assert_eq!(v["group"], "flagship");
    assert_eq!(v["output_cap"], 100);
    assert_eq!(v["exactness"], "exact");
    let prompt = v["prompt_tokens"].as_u64().unwrap_or_default();
    assert!(prompt > 6);
    assert_eq!(v["reservation"], prompt + 100);

    let dir = std::env::temp_dir().join(format!("tokenwarden-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join("body.json");
    std::fs::write(
        &path,
        br#"{"model": "text-embedding-3-small", "input": "hello world"}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let path = path.to_string_lossy().into_owned();
    assert_eq!(
        stdout(&run(
            &["count", "--request", &path, "--endpoint", "embeddings"],
            None
        )),
        "2\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn errors_exit_non_zero_with_a_clear_message() {
    let out = run(&["count", "--model", "gpt-4p", "hi"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gpt-4p") && err.contains("Did you mean gpt-4o"),
        "{err}"
    );

    let out = run(
        &["count", "--request", "-"],
        Some(br#"{"model": "gpt-4o", "messages": []}"#),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("param: messages"));

    let out = run(
        &["count", "--request", "-", "--endpoint", "images"],
        Some(b"{}"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoint"));

    let out = run(&["count"], Some(b"\xff\xfe"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UTF-8"));
}

#[test]
fn check_config_accepts_a_good_file_and_names_the_line_of_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("tokenwarden-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[upstreams.sim]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"tw-0123456789abcdef\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let path = good.to_string_lossy().into_owned();
    let out = stdout(&run(&["check-config", "--config", &path], None));
    assert!(
        out.contains("ok (1 orgs, 1 projects, 1 keys, 1 upstreams)"),
        "{out}"
    );
    assert!(!out.contains("warning"), "{out}");

    // A forward rule that opens shared objects or spending is warned of;
    // a harmless one is not.
    let risky = dir.join("risky.toml");
    std::fs::write(
        &risky,
        "[upstreams.sim]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"tw-0123456789abcdef\"]\nforward = [\"GET /files\", \"POST /images/generations\", \"GET /models\", \"DELETE /models\", \"DELETE /foo\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let path = risky.to_string_lossy().into_owned();
    let out = stdout(&run(&["check-config", "--config", &path], None));
    assert!(
        out.contains("warning: org acme project web: forward \"GET /files\""),
        "{out}"
    );
    assert!(
        out.contains("forward \"POST /images/generations\""),
        "{out}"
    );
    assert!(!out.contains("GET /models\""), "{out}");
    assert!(
        out.contains("forward \"DELETE /models\" opens /v1/models"),
        "{out}"
    );
    assert!(
        out.contains("forward \"DELETE /foo\" opens a DELETE"),
        "{out}"
    );

    // A rule that names a metered path or another method is an error.
    let bad_rule = dir.join("bad-rule.toml");
    std::fs::write(
        &bad_rule,
        "[upstreams.sim]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"tw-0123456789abcdef\"]\nforward = [\"TRACE /files\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let path = bad_rule.to_string_lossy().into_owned();
    let out = run(&["check-config", "--config", &path], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("forward[0]") && err.contains("GET, POST and DELETE"),
        "{err}"
    );

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:0\"\nlisten_backlog = 5\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let path = bad.to_string_lossy().into_owned();
    let out = run(&["check-config", "--config", &path], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("listen_backlog"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tokenwarden serve` with no configuration file and `OPENAI_API_KEY` set:
/// one org, project and key in front of the OpenAI API. (The test machine
/// has no route to OpenAI, so it checks everything short of an upstream
/// call: the printed key and admin token work, the ledger is made, the
/// upstream key is never printed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_only_an_openai_key() {
    use std::io::{BufRead, BufReader};
    let dir = crate::harness::temp_dir("openai-key");
    let upstream_key = "sk-test-upstream-0123456789abcdef";
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .env("OPENAI_API_KEY", upstream_key)
        .env("TOKENWARDEN_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    for _ in 0..5 {
        match lines.next() {
            Some(Ok(line)) => printed.push(line),
            _ => break,
        }
    }
    let text = printed.join("\n");
    let field = |label: &str| {
        printed
            .iter()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {label} in:\n{text}"))
    };
    assert!(text.contains("in front of the OpenAI API"), "{text}");
    let base = field("base URL:");
    let key = field("API key:");
    let admin = field("admin token:");
    assert!(
        admin.starts_with("tw-admin-") && admin.len() >= 40,
        "{admin}"
    );
    assert!(key.starts_with("tw-") && key.len() >= 40, "{key}");
    let client = crate::harness::http_client();
    let models = client
        .get(format!("{base}/models"))
        .bearer_auth(&key)
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(models.unwrap_or(0), 200);
    let wrong = client
        .get(format!("{base}/models"))
        .bearer_auth("tw-not-the-key-00000000000")
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(wrong.unwrap_or(0), 401);
    let usage = client
        .get(format!(
            "{base}/organization/usage/completions?start_time=0"
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(usage.unwrap_or(0), 200);
    assert!(dir.join("tokenwarden.db").exists());
    let _ = child.kill();
    let output = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!text.contains(upstream_key) && !stderr.contains(upstream_key));

    // A restart in the same folder prints no new keys, and the first ones
    // still work: they are kept, hashed, in the ledger.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .env("OPENAI_API_KEY", upstream_key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let again: Vec<String> = BufReader::new(stdout)
        .lines()
        .take(5)
        .map_while(Result::ok)
        .collect();
    let again_text = again.join("\n");
    assert!(
        again_text.contains("those printed when tokenwarden.db was made")
            && again_text.contains("another API key:"),
        "{again_text}"
    );
    assert!(!again_text.contains(&key) && !again_text.contains(&admin));
    let base = again
        .iter()
        .find_map(|l| l.trim().strip_prefix("base URL:"))
        .map(|b| b.trim().to_owned())
        .unwrap_or_else(|| panic!("{again_text}"));
    let models = client
        .get(format!("{base}/models"))
        .bearer_auth(&key)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(models, 200, "the first key works after a restart");
    let usage = client
        .get(format!(
            "{base}/organization/usage/completions?start_time=0"
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(usage, 200, "the first admin token works after a restart");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An address in use: the error names it, and no ledger is left behind.
#[test]
fn an_address_in_use_is_named_and_leaves_no_ledger() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = taken.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let dir = crate::harness::temp_dir("address-in-use");
    let config = dir.join("tokenwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{addr}\"\n\n[store]\nurl = \"sqlite://{}\"\n\n[upstreams.main]\nbase_url = \"http://127.0.0.1:9/v1\"\n",
            dir.join("ledger.db").display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(left, ["tokenwarden.toml"], "files left behind");
    drop(taken);
}

#[test]
fn serve_help_says_what_each_way_of_running_needs() {
    let out = run(&["serve", "--help"], None);
    let text = stdout(&out);
    for needed in [
        "--config FILE",
        "tokenwarden.toml",
        "OPENAI_API_KEY",
        "--demo",
        "nothing needed",
    ] {
        assert!(text.contains(needed), "no {needed:?} in:\n{text}");
    }
}

/// Relative paths in a configuration file are its folder's, whatever the
/// working directory; a command that reads makes no empty ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_paths_are_the_config_files_folders() {
    let dir = crate::harness::temp_dir("relative-config");
    let elsewhere = crate::harness::temp_dir("relative-cwd");
    let tls = crate::harness::repo("tests/data/tls/ca.pem");
    std::fs::copy(&tls, dir.join("ca.pem")).unwrap_or_else(|e| panic!("{e}"));
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://ledger/rel.db\"\n\n[upstreams.main]\nbase_url = \"https://127.0.0.1:9/v1\"\nca_file = \"ca.pem\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"tw-relative-key-000000001\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(dir.join("ledger")).unwrap_or_else(|e| panic!("{e}"));
    let command = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(&elsewhere)
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    // check-config finds ca.pem beside the file.
    let out = command(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // usage before any serve: an error naming the ledger, and no file made.
    let out = command(&["usage"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no ledger at"),
        "{stderr}"
    );
    assert!(!dir.join("ledger/rel.db").exists());
    assert_eq!(
        std::fs::read_dir(&elsewhere)
            .map(Iterator::count)
            .unwrap_or(1),
        0
    );
    // serve makes it beside the file; then usage reads it from anywhere.
    let (mut child, _) = crate::harness::serve_process(
        Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(&elsewhere)
            .stderr(Stdio::null()),
    );
    assert!(dir.join("ledger/rel.db").exists());
    let _ = child.kill();
    let _ = child.wait();
    let out = command(&["usage"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&elsewhere)
            .map(Iterator::count)
            .unwrap_or(1),
        0,
        "nothing made in the working directory"
    );
}
