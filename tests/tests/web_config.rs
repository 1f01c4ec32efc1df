//! `--web.config.file` with exporter-toolkit's format: a real Prometheus scrapes the agent over
//! TLS with basic auth; a wrong password gets 401, plain HTTP to the TLS port gets no HTTP
//! answer, and a file that does not load stops the agent with one line naming the flag.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use keepalive_tests::agent::{free_loopback_port, http_request};
use keepalive_tests::deploy::{ScratchDir, Server, tool_available};
use keepalive_tests::{Agent, agent_bin, kernel_tests_enabled, skip_or_fail, wait_until};

const USER: &str = "prometheus";
const PASSWORD: &str = "scrape-secret";
/// Prometheus' first scrapes, then the query: generous on a loaded machine.
const SCRAPED_WITHIN: Duration = Duration::from_secs(90);

/// A self-signed certificate for 127.0.0.1 (`cert.pem`, `key.pem` in `dir`).
fn self_signed_certificate(dir: &Path) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=keepalive-agent test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    ensure!(
        output.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// curl's status code for `url` (0 when no HTTP answer came), with `-u user:password` if given.
fn curl_status(dir: &Path, url: &str, credentials: Option<&str>) -> anyhow::Result<u16> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ])
    .args(["--cacert", "cert.pem"])
    .current_dir(dir);
    if let Some(credentials) = credentials {
        cmd.args(["-u", credentials]);
    }
    let output = cmd.arg(url).output().context("running curl")?;
    let code = String::from_utf8_lossy(&output.stdout);
    code.trim()
        .parse()
        .with_context(|| format!("curl -w %{{http_code}} printed {code:?}"))
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_gets_401() -> anyhow::Result<()>
{
    let test = "prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_gets_401";
    if !kernel_tests_enabled(test)
        || !tool_available(test, "prometheus", "--version", "Debian package prometheus")
        || !tool_available(test, "openssl", "version", "Debian package openssl")
        || !tool_available(test, "curl", "--version", "Debian package curl")
    {
        return Ok(());
    }
    let scratch = ScratchDir::new("web-config")?;
    let dir = &scratch.0;
    self_signed_certificate(dir)?;
    let hash = bcrypt::hash(PASSWORD, 8)?;
    // Relative paths: exporter-toolkit resolves them against the file's directory.
    fs::write(
        dir.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n\
             basic_auth_users:\n  {USER}: {hash}\n"
        ),
    )?;
    let web_config = dir.join("web.yml").to_string_lossy().into_owned();
    let credentials = format!("{USER}:{PASSWORD}");
    let agent =
        match Agent::start_with_args_ready_when(&["--web.config.file", &web_config], &mut |addr| {
            curl_status(dir, &format!("https://{addr}/readyz"), Some(&credentials))
                .is_ok_and(|code| code == 200)
        }) {
            Ok(agent) => agent,
            Err(e) => {
                skip_or_fail(test, &format!("the agent did not start: {e:#}"));
                return Ok(());
            }
        };
    let addr = agent.addr();
    let metrics = format!("https://{addr}/metrics");

    assert_eq!(curl_status(dir, &metrics, Some(&credentials))?, 200);
    assert_eq!(
        curl_status(dir, &metrics, Some(&format!("{USER}:wrong")))?,
        401
    );
    assert_eq!(curl_status(dir, &metrics, Some("nobody:x"))?, 401);
    assert_eq!(curl_status(dir, &metrics, None)?, 401);
    // Plain HTTP to the TLS port: no HTTP answer at all.
    assert_eq!(
        curl_status(dir, &format!("http://{addr}/metrics"), None)?,
        0
    );
    assert!(
        http_request(addr, "/metrics", &[]).is_err(),
        "plain HTTP got an HTTP answer from the TLS port"
    );

    fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: keepalive-agent\n    scheme: https\n\
             \x20   tls_config:\n      ca_file: cert.pem\n\
             \x20   basic_auth:\n      username: {USER}\n      password: {PASSWORD}\n\
             \x20   static_configs:\n      - targets: ['{addr}']\n"
        ),
    )?;
    let prometheus = Server::start_in(
        None,
        "prometheus",
        "prometheus",
        &[
            "--config.file=prometheus.yml".into(),
            format!("--storage.tsdb.path={}", dir.join("prom-data").display()),
            "--web.listen-address={addr}".into(),
        ],
        dir,
        "/-/ready",
    )?;
    let mut last = String::new();
    let scraped = wait_until(SCRAPED_WITHIN, "Prometheus to scrape the agent", || {
        let up = prometheus.query("up{job=\"keepalive-agent\"}")?;
        let build = prometheus.query("keepalive_agent_build_info")?;
        last = format!("up: {up:?}; build_info: {build:?}");
        Ok(up.first().is_some_and(|s| s["value"][1] == "1") && !build.is_empty())
    });
    if let Err(e) = scraped {
        let targets = prometheus.get_json("/api/v1/targets").unwrap_or_default();
        bail!("{e:#}; last: {last}; targets: {targets}");
    }
    Ok(())
}

/// Whether the peer closed `s` (EOF or reset), without blocking.
fn closed_by_peer(s: &std::net::TcpStream) -> bool {
    s.set_nonblocking(true).ok();
    let mut buf = [0u8; 64];
    match std::io::Read::read(&mut &*s, &mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[test]
fn clients_that_never_start_a_tls_handshake_are_shed_and_timed_out_like_slowloris()
-> anyhow::Result<()> {
    let test = "clients_that_never_start_a_tls_handshake_are_shed_and_timed_out_like_slowloris";
    if !kernel_tests_enabled(test)
        || !tool_available(test, "openssl", "version", "Debian package openssl")
        || !tool_available(test, "curl", "--version", "Debian package curl")
    {
        return Ok(());
    }
    let scratch = ScratchDir::new("web-config-idle")?;
    let dir = &scratch.0;
    self_signed_certificate(dir)?;
    fs::write(
        dir.join("web.yml"),
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n",
    )?;
    let web_config = dir.join("web.yml").to_string_lossy().into_owned();
    let agent =
        match Agent::start_with_args_ready_when(&["--web.config.file", &web_config], &mut |addr| {
            curl_status(dir, &format!("https://{addr}/readyz"), None).is_ok_and(|code| code == 200)
        }) {
            Ok(agent) => agent,
            Err(e) => {
                skip_or_fail(test, &format!("the agent did not start: {e:#}"));
                return Ok(());
            }
        };
    let addr = agent.addr();
    // More silent connections than the agent's cap (64): none of them sends a ClientHello.
    let idle: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .collect::<Result<_, _>>()?;
    // A scraper still gets in: the cap sheds the oldest silent one for it.
    assert_eq!(
        curl_status(dir, &format!("https://{addr}/metrics"), None)?,
        200
    );
    // And every silent one is closed, by shedding or by the handshake deadline.
    wait_until(
        Duration::from_secs(60),
        "every silent connection closed",
        || Ok(idle.iter().all(closed_by_peer)),
    )?;
    let shed = curl_metric(dir, addr, "keepalive_agent_http_connections_shed_total")?;
    ensure!(
        shed >= 1.0,
        "keepalive_agent_http_connections_shed_total = {shed}"
    );
    Ok(())
}

/// The value of an unlabelled metric, scraped over TLS.
fn curl_metric(dir: &Path, addr: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    let output = Command::new("curl")
        .args(["-sf", "--max-time", "10", "--cacert", "cert.pem"])
        .arg(format!("https://{addr}/metrics"))
        .current_dir(dir)
        .output()
        .context("running curl")?;
    ensure!(output.status.success(), "curl /metrics failed");
    let body = String::from_utf8_lossy(&output.stdout);
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .with_context(|| format!("no {name} in the scrape"))?
        .trim()
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

/// Runs `openssl args...` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl")?;
    ensure!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn required_client_certificates_admit_only_clients_signed_by_the_client_ca() -> anyhow::Result<()> {
    let test = "required_client_certificates_admit_only_clients_signed_by_the_client_ca";
    if !kernel_tests_enabled(test)
        || !tool_available(test, "openssl", "version", "Debian package openssl")
        || !tool_available(test, "curl", "--version", "Debian package curl")
    {
        return Ok(());
    }
    let scratch = ScratchDir::new("web-config-mtls")?;
    let dir = &scratch.0;
    self_signed_certificate(dir)?;
    // A client CA, a client certificate it signs, and one signed by nobody the agent trusts.
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &key,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=test client CA",
            ],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            &["req"][..],
            &key,
            &[
                "-keyout",
                "client.key",
                "-out",
                "client.csr",
                "-subj",
                "/CN=prometheus",
            ],
        ]
        .concat(),
    )?;
    // WebPKI takes only X.509 v3 certificates: extensions make `x509 -req` write one.
    fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-extfile",
            "client.ext",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
        ],
    )?;
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &key,
            &[
                "-keyout",
                "stranger.key",
                "-out",
                "stranger.pem",
                "-days",
                "2",
                "-subj",
                "/CN=stranger",
            ],
        ]
        .concat(),
    )?;
    fs::write(
        dir.join("web.yml"),
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n\
         \x20 client_ca_file: ca.pem\n  client_auth_type: RequireAndVerifyClientCert\n",
    )?;
    let web_config = dir.join("web.yml").to_string_lossy().into_owned();
    let status_with = |addr: std::net::SocketAddr, client: Option<&str>| -> anyhow::Result<u16> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--cacert", "cert.pem"])
        .current_dir(dir);
        if let Some(client) = client {
            cmd.args([
                "--cert",
                &format!("{client}.pem"),
                "--key",
                &format!("{client}.key"),
            ]);
        }
        let output = cmd
            .arg(format!("https://{addr}/metrics"))
            .output()
            .context("running curl")?;
        let code = String::from_utf8_lossy(&output.stdout);
        code.trim()
            .parse()
            .with_context(|| format!("curl -w %{{http_code}} printed {code:?}"))
    };
    let agent =
        match Agent::start_with_args_ready_when(&["--web.config.file", &web_config], &mut |addr| {
            status_with(addr, Some("client")).is_ok_and(|code| code == 200)
        }) {
            Ok(agent) => agent,
            Err(e) => {
                skip_or_fail(test, &format!("the agent did not start: {e:#}"));
                return Ok(());
            }
        };
    let addr = agent.addr();
    assert_eq!(status_with(addr, Some("client"))?, 200);
    // The handshake fails: no HTTP status at all.
    assert_eq!(status_with(addr, None)?, 0, "no client certificate");
    assert_eq!(
        status_with(addr, Some("stranger"))?,
        0,
        "a certificate the CA did not sign"
    );
    Ok(())
}

/// Runs `run` with `--web.config.file path`; (exit code, stderr) once it exits by itself.
fn run_with_web_config(path: &Path) -> anyhow::Result<(i32, String)> {
    let addr = free_loopback_port()?;
    let mut child = Command::new(agent_bin())
        .args(["run", "--web.listen-address", &addr.to_string()])
        .arg("--web.config.file")
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} was accepted: the agent kept running", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().context("stderr")?, &mut stderr)?;
    Ok((status.code().unwrap_or(-1), stderr))
}

#[test]
fn a_web_config_file_that_does_not_load_stops_the_agent_with_one_line() -> anyhow::Result<()> {
    let scratch = ScratchDir::new("web-config-broken")?;
    let dir = &scratch.0;
    let cases: &[(&str, &str, &str)] = &[
        ("syntax", "tls_server_config: [\n", "web.yml"),
        (
            "unknown field",
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
            "cipher_suites",
        ),
        (
            "plain password",
            "basic_auth_users:\n  u: secret\n",
            "not a bcrypt hash",
        ),
        (
            "missing certificate",
            "tls_server_config:\n  cert_file: nowhere.pem\n  key_file: nowhere.key\n",
            "cert_file",
        ),
        (
            "client CA without a policy",
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_ca_file: ca.pem\n",
            "client_auth_type",
        ),
    ];
    for (what, yaml, names) in cases {
        let path = dir.join("web.yml");
        fs::write(&path, yaml)?;
        let (code, stderr) = run_with_web_config(&path)?;
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        ensure!(code == 1, "{what}: exit code {code}; stderr:\n{stderr}");
        ensure!(
            lines.len() == 1
                && lines[0].starts_with("error: ")
                && lines[0].contains("--web.config.file")
                && lines[0].contains(names),
            "{what}: want one error line naming --web.config.file and {names:?}, got:\n{stderr}"
        );
    }
    let (code, stderr) = run_with_web_config(&dir.join("absent.yml"))?;
    ensure!(
        code == 1 && stderr.contains("does not exist"),
        "absent file: {code} {stderr}"
    );
    Ok(())
}
