//! The web console (`ferryctl ui`) driven in headless Chromium against two real agents
//! with a real QEMU guest: it lists both hosts and the running VM, refuses a request
//! without the session token, shows the agent's own error for a bad target, migrates
//! the VM from the page (preflight, confirm), shows progress moving within round 0 and
//! the report at the end, and then lists the VM on the other host. Where the VM runs is
//! then asked of both agents and of the QEMU processes, not only of the page.
//!
//! Needs `chromium` and `chromium-driver` (scripts/install-deps.sh installs them) and the
//! `ferryctl` binary next to `ferryd` (scripts/test.sh builds the workspace first).
//! `FERRY_UPDATE_SCREENSHOTS=1` also writes the screenshots to `docs/`.

use fantoccini::{Client, ClientBuilder, Locator};
use ferry_api::v1 as pb;
use ferry_testkit::{
    guest_artifacts, parse_check, workload_cmdline, GuestConsole, TestAgent, TestPki,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ferryd() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferryd"))
}

fn ferryctl() -> PathBuf {
    let p = ferryd().with_file_name("ferryctl");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (scripts/test.sh does; or cargo build -p ferryctl)",
        p.display()
    );
    p
}

/// Kills a child process when dropped (the console, chromedriver).
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `ferryctl ui` and returns it with the address it printed (token included).
fn start_console(hosts_file: &Path, pki: &TestPki) -> (Reaped, String) {
    let mut child = Command::new(ferryctl())
        .args(["ui", "--listen", "127.0.0.1:0", "--hosts"])
        .arg(hosts_file)
        .arg("--pki-dir")
        .arg(pki.dir())
        .args(["--identity", ferry_testkit::TEST_OPERATOR])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ferryctl ui");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    let mut reader = BufReader::new(out);
    reader
        .read_line(&mut line)
        .expect("the console's first line");
    // The rest of its output is drained, not left to a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let url = line
        .trim()
        .strip_prefix("ferry console: ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Reaped(child), url)
}

/// One raw HTTP/1.1 request; returns the status code.
async fn http_status(addr: &str, path: &str, host: &str, cookie: Option<&str>) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// One raw HTTP/1.1 POST of a JSON body; returns the status code and the response body.
async fn http_post(addr: &str, path: &str, host: &str, cookie: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (code, text)
}

async fn browser() -> (Reaped, Client) {
    for bin in ["chromedriver", "chromium"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{bin} is missing: install chromium and chromium-driver (scripts/install-deps.sh)"
        );
    }
    let port = free_port();
    let driver = Reaped(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1500"],
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let conn = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(conn)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return (driver, c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("no WebDriver session from chromedriver: {e}"),
        }
    }
}

/// Waits until `css` matches an element whose text satisfies `ok`; returns the text.
async fn wait_text(c: &Client, css: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{css}: no matching text within {secs} s (last: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn select(c: &Client, css: &str, value: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .select_by_value(value)
        .await
        .unwrap_or_else(|e| panic!("select {value} in {css}: {e}"));
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let root = ferry_testkit::repo_root().expect("repo root");
    let dir = root.join("target/console-screens");
    std::fs::create_dir_all(&dir).expect("screens dir");
    std::fs::write(dir.join(name), &png).expect("write screenshot");
    if std::env::var("FERRY_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        std::fs::write(root.join("docs").join(name), &png).expect("write docs screenshot");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_lists_hosts_migrates_a_vm_and_shows_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let a = TestAgent::start(&ferryd(), "a", &pki, dir.path(), "tcg")
        .await
        .expect("agent a");
    let b = TestAgent::start(&ferryd(), "b", &pki, dir.path(), "tcg")
        .await
        .expect("agent b");
    let g = guest_artifacts().expect("guest artifacts: run scripts/build-guest.sh");
    let src = a
        .define_and_boot(pb::VmSpec {
            name: "web01".into(),
            vcpus: 1,
            memory_mib: 384,
            kernel: g.kernel.display().to_string(),
            initrd: g.initrd.display().to_string(),
            cmdline: workload_cmdline(160, 5.0, "realistic", 7),
            ..Default::default()
        })
        .await
        .expect("boot the guest on a");

    // The hosts file the console reads: both agents, and one that is not there.
    let hosts = dir.path().join("hosts.toml");
    std::fs::write(
        &hosts,
        format!(
            "[hosts]\na = \"{}\"\nb = \"{}\"\ngone = \"127.0.0.1:1\"\n",
            a.grpc_addr(),
            b.grpc_addr()
        ),
    )
    .expect("hosts file");
    let (_console, url) = start_console(&hosts, &pki);
    let (addr, token) = url
        .strip_prefix("http://")
        .and_then(|r| r.split_once("/?token="))
        .expect("http://ADDR/?token=T");
    let port = addr.rsplit_once(':').expect("port").1.to_string();
    let local = format!("127.0.0.1:{port}");

    // No token, a wrong one, or a foreign Host header: refused.
    assert_eq!(http_status(addr, "/api/hosts", &local, None).await, 401);
    assert_eq!(http_status(addr, "/", &local, None).await, 401);
    assert_eq!(
        http_status(
            addr,
            "/api/hosts",
            &local,
            Some(&format!("ferry_ui_{port}=0123"))
        )
        .await,
        401
    );
    // The session cookie is named after the console's port; another port's is no key.
    assert_eq!(
        http_status(
            addr,
            "/api/hosts",
            &local,
            Some(&format!("ferry_ui_1={token}"))
        )
        .await,
        401
    );
    let cookie = format!("ferry_ui_{port}={token}");
    assert_eq!(
        http_status(addr, "/api/hosts", "evil.example", Some(&cookie)).await,
        421,
        "a rebinding name is refused even with the token"
    );
    assert_eq!(
        http_status(addr, "/api/hosts", &local, Some(&cookie)).await,
        200
    );
    // The operator's verdict goes to the agent, whose refusal comes back as it is.
    let (code, text) = http_post(
        addr,
        "/api/resolve",
        &local,
        &cookie,
        r#"{"host":"a","id":"no-such-migration"}"#,
    )
    .await;
    assert_eq!(code, 404, "{text}");
    assert!(
        text.contains("no migration no-such-migration on host a"),
        "{text}"
    );

    let (_driver, c) = browser().await;
    c.goto(&url).await.expect("open the console");
    // Both hosts with their facts, the VM running on a.
    wait_text(&c, ".host[data-host='a']", 30, |t| t.contains("QEMU")).await;
    wait_text(&c, ".host[data-host='b']", 30, |t| t.contains("QEMU")).await;
    wait_text(&c, ".host[data-host='gone']", 30, |t| !t.is_empty()).await;
    wait_text(
        &c,
        ".host[data-host='a'] .vm[data-vm='web01'] .state",
        30,
        |t| t == "RUNNING",
    )
    .await;
    // The token left the address bar (it lives in an HttpOnly cookie now).
    let now = c.current_url().await.expect("url");
    assert!(!now.as_str().contains("token"), "{now}");

    // A target whose agent is not there: the source agent's own error, shown as it is.
    click(
        &c,
        ".host[data-host='a'] .vm[data-vm='web01'] button.migrate",
    )
    .await;
    select(&c, "#mig-target", "gone").await;
    click(&c, "#mig-preflight").await;
    let err = wait_text(&c, "#preflight-error", 60, |t| !t.is_empty()).await;
    assert!(
        err.contains("cannot reach target agent 127.0.0.1:1 from a"),
        "{err}"
    );

    // The real move: preflight, confirm, watch. A bandwidth cap makes round 0 last.
    select(&c, "#mig-target", "b").await;
    let bw = c.find(Locator::Css("#mig-bw")).await.expect("bw field");
    bw.clear().await.expect("clear");
    bw.send_keys("40").await.expect("type");
    click(&c, "#mig-preflight").await;
    let verdict = wait_text(&c, "#preflight-verdict", 90, |t| !t.is_empty()).await;
    assert!(verdict.contains("passed"), "{verdict}");
    click(&c, "#mig-go").await;

    let live = ".migration[data-vm='web01']";
    // Progress within round 0: the bytes and the elapsed time move while the round runs.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut eta_seen = false;
    let mut shot = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let phase = wait_text(&c, &format!("{live} .phase"), 60, |_| true).await;
        if phase != "PRECOPY" && phase != "PREPARING" && phase != "CONNECTING" {
            break;
        }
        let round = c.find(Locator::Css(&format!("{live} .round"))).await.ok();
        let round = match round {
            Some(e) => e.text().await.unwrap_or_default(),
            None => String::new(),
        };
        if round == "round 0" {
            let bytes = wait_text(&c, &format!("{live} .bytes"), 5, |_| true).await;
            let elapsed = wait_text(&c, &format!("{live} .elapsed"), 5, |_| true).await;
            let eta = wait_text(&c, &format!("{live} .eta"), 5, |_| true).await;
            eta_seen |= !eta.ends_with('–');
            if seen.last() != Some(&(bytes.clone(), elapsed.clone())) {
                seen.push((bytes, elapsed));
            }
            if !shot && seen.len() >= 6 {
                screenshot(&c, "console-migrating.png").await;
                shot = true;
            }
        } else if round.starts_with("round") && !round.ends_with(" 0") {
            break;
        }
        assert!(Instant::now() < deadline, "round 0 never ended: {seen:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let distinct_bytes: std::collections::BTreeSet<&String> = seen.iter().map(|s| &s.0).collect();
    let distinct_elapsed: std::collections::BTreeSet<&String> = seen.iter().map(|s| &s.1).collect();
    assert!(
        distinct_bytes.len() >= 3 && distinct_elapsed.len() >= 3,
        "the page moved within round 0: {seen:?}"
    );
    assert!(eta_seen, "an ETA was shown during round 0");

    // The end: the report, then the VM listed on b and no longer on a.
    let phase = wait_text(&c, &format!("{live} .phase"), 180, |t| {
        matches!(t, "COMPLETED" | "FAILED" | "CANCELLED")
    })
    .await;
    assert_eq!(phase, "COMPLETED", "{}", a.log_tail());
    let outcome = wait_text(&c, &format!("{live} .report .outcome"), 10, |_| true).await;
    assert!(outcome.starts_with("COMPLETED"), "{outcome}");
    wait_text(
        &c,
        ".host[data-host='b'] .vm[data-vm='web01'] .state",
        30,
        |t| t == "RUNNING",
    )
    .await;
    let still_on_a = c
        .find_all(Locator::Css(".host[data-host='a'] .vm[data-vm='web01']"))
        .await
        .expect("query");
    assert!(still_on_a.is_empty(), "the page lists web01 on a still");
    wait_text(&c, "#history .history-row", 30, |t| t.contains("web01")).await;
    screenshot(&c, "console-done.png").await;
    c.close().await.expect("close the browser");

    // Not only the page: the agents and the processes.
    let mut ca = a.client().await.expect("client a");
    let gone = ca
        .get_vm(pb::VmRef {
            name: "web01".into(),
        })
        .await
        .expect_err("web01 left a");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    assert!(
        !Path::new(&format!("/proc/{}", src.pid)).exists(),
        "source QEMU gone"
    );
    let mut cb = b.client().await.expect("client b");
    let dst = cb
        .get_vm(pb::VmRef {
            name: "web01".into(),
        })
        .await
        .expect("web01 on b")
        .into_inner();
    assert_eq!(dst.state, pb::VmState::Running as i32);
    let mut con = GuestConsole::connect(Path::new(&dst.console_socket), Duration::from_secs(10))
        .await
        .expect("console on b");
    let line = con
        .command("check", "FERRY-CHECK", Duration::from_secs(120))
        .await
        .expect("check reply");
    assert!(parse_check(&line).expect("parse").ok, "{line}");
}
