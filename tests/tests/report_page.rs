//! A compliance officer's view: headless Chromium (driven over WebDriver by
//! chromedriver) signs in to the report pages with an auditor token, follows the round
//! list to a finished round and reads its report. The browser trusts the server's
//! self-signed certificate only by its pinned public key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;
use tessera_client::{participate, Api, Options, Participation};
use tessera_server::auth::{AccessGrant, Role};
use tessera_server::config::RoundParams;
use tessera_tests::*;

const AUDITOR: &str = "auditor-token-for-the-browser-0123";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A minimal WebDriver client: JSON over HTTP/1.0 to chromedriver on loopback.
struct WebDriver {
    port: u16,
    session: String,
    child: Child,
}

fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open: read the head, then Content-Length bytes.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no content-length in {head}")))?;
    let mut json = vec![0u8; len];
    s.read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(|e| std::io::Error::other(format!("{e}: {}", String::from_utf8_lossy(&json))))
}

impl WebDriver {
    fn start(spki_sha256: [u8; 32], profile: &std::path::Path) -> WebDriver {
        let driver = which("chromedriver");
        let browser = which("chromium");
        let port = free_port();
        let child = Command::new(driver).arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/status", None).map(|v| v["value"]["ready"] != true).unwrap_or(true) {
            assert!(Instant::now() < deadline, "chromedriver did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        let pin = base64::engine::general_purpose::STANDARD.encode(spki_sha256);
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": browser,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", profile.display()),
                     format!("--ignore-certificate-errors-spki-list={pin}")]}}}});
        let v = http(port, "POST", "/session", Some(&caps)).unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {v}")).to_string();
        WebDriver { port, session, child }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let v = http(self.port, method, &format!("/session/{}{path}", self.session), body.as_ref()).unwrap();
        assert!(v["value"]["error"].is_null(), "{method} {path}: {v}");
        v["value"].clone()
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        v[ELEMENT].as_str().unwrap().to_string()
    }

    /// Waits until an element matching `css` exists (a click's navigation is asynchronous).
    fn wait_for(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = http(self.port, "POST", &format!("/session/{}/element", self.session), Some(&json!({"using": "css selector", "value": css}))).unwrap();
            if v["value"][ELEMENT].is_string() {
                return;
            }
            assert!(Instant::now() < deadline, "{css} never appeared; the page says: {}", self.text("body"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&self, css: &str) -> String {
        let id = self.find(css);
        self.cmd("GET", &format!("/element/{id}/text"), None).as_str().unwrap().to_string()
    }

    fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }
}

impl Drop for WebDriver {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(name: &str) -> String {
    let out = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().unwrap();
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!path.is_empty(), "{name} is not installed: scripts/setup installs Debian's chromium and chromium-driver");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compliance_officer_reads_a_round_report_in_chromium() {
    let root = tempfile::tempdir().unwrap();
    let ids = institutions(root.path(), 3);
    let params = RoundParams { vector_len: 32, max_weight: 10, phase_timeout_ms: 20_000, ..RoundParams::default() };
    let mut cfg = server_config(&root.path().join("server"), "127.0.0.1:0".parse().unwrap(), &ids, params, 1);
    cfg.access = vec![AccessGrant {
        name: "compliance-office".into(),
        role: Role::Auditor,
        institution: None,
        token_sha256: Some(hex::encode(sha2::Sha256::digest(AUDITOR.as_bytes()))),
        client_cert_spki_sha256: None,
    }];
    let server = tessera_server::spawn(cfg).await.unwrap();
    let url = format!("https://{}", server.addr);
    let mut tasks = Vec::new();
    for (i, (dir, _)) in ids.iter().enumerate() {
        let identity = tessera_client::Identity::load(dir).unwrap();
        let api = Api::new(&url, server.fingerprint).unwrap();
        let update = (synthetic_update(i, 1, 32), 1);
        let opts = Options { insecure_dev: true, wait: Duration::from_secs(60), round: Some(1), quiet: true, ..Options::default() };
        tasks.push(tokio::spawn(async move { participate(&api, &identity, &opts, move |_| Ok(update)).await }));
    }
    for t in tasks {
        assert!(matches!(t.await.unwrap().unwrap(), Participation::Completed(_)));
    }
    let mean = Api::new(&url, server.fingerprint).unwrap().with_bearer(AUDITOR).get_bytes("/v1/rounds/1/result/mean").await.unwrap();

    let profile = root.path().join("chromium-profile");
    let fingerprint = server.fingerprint;
    let base = url.clone();
    let mean_sha = hex::encode(sha2::Sha256::digest(&mean));
    tokio::task::spawn_blocking(move || {
        let wd = WebDriver::start(fingerprint, &profile);
        // Without a session the round list answers with the sign-in form.
        wd.go(&format!("{base}/reports"));
        wd.wait_for("#token");
        assert!(wd.text("#error").contains("needs a bearer token"), "{}", wd.text("body"));
        let token = wd.find("#token");
        wd.cmd("POST", &format!("/element/{token}/value"), Some(json!({"text": AUDITOR})));
        let signin = wd.find("#signin");
        wd.cmd("POST", &format!("/element/{signin}/click"), Some(json!({})));
        wd.wait_for("#rounds");
        assert!(wd.url().ends_with("/reports"), "{}", wd.url());
        let list = wd.text("#rounds");
        assert!(list.contains("Round 1") && list.contains("finished") && list.contains("institution-2"), "{list}");
        assert!(wd.text("body").contains("Signed in as compliance-office (auditor)"));
        // Follow the link to the report.
        let link = wd.find("#rounds a");
        wd.cmd("POST", &format!("/element/{link}/click"), Some(json!({})));
        wd.wait_for("#status");
        assert!(wd.url().ends_with("/reports/1"), "{}", wd.url());
        assert_eq!(wd.text("#status"), "released");
        assert!(wd.text("#insecure").contains("INSECURE DEV MODE"));
        assert_eq!(wd.text("#aggregator-measurement").len(), 96, "a SHA-384 measurement in hex");
        let participants = wd.text("#participants");
        for i in 0..3 {
            assert!(participants.contains(&format!("institution-{i}")), "{participants}");
        }
        assert_eq!(participants.matches("admitted").count(), 3, "{participants}");
        assert_eq!(wd.text("#mean-sha256"), mean_sha);
        assert!(wd.text("#privacy").contains("without differential privacy"));
        assert!(wd.text("#entries").contains("released"));
        let title = wd.cmd("GET", "/title", None);
        assert_eq!(title, "Tessera — round 1 report");
    })
    .await
    .unwrap();
    server.stop().await;
}
