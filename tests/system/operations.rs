//! Operations: the metrics a real Prometheus scrapes (read back with promtool), `GET
//! /health` saying whether messages are moving and why not, and the systemd watchdog fed
//! only while they are.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::clients::{device_tls, expect_connack_refusal, options, Client};
use crate::support::upstream::{Link, Upstream};
use crate::support::{require, Gateway, Site, DEADLINE};

/// One GET over plain HTTP/1.1: the status code, the headers and the body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// A Prometheus server scraping `target` every second, on loopback.
struct Prometheus {
    url: String,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        require("prometheus", "prometheus");
        require("promtool", "prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: wardgate\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            _child: child,
            _dir: dir,
        };
        // Ready once it answers a query and has scraped the target at least once.
        p.wait_for("up", |v| v == 1.0).await;
        p
    }

    /// `expr`'s values now, as promtool reads them from the server.
    fn query(&self, expr: &str) -> Vec<(String, f64)> {
        let out = std::process::Command::new("promtool")
            .args(["query", "instant", &self.url, expr])
            .output()
            .expect("run promtool");
        if !out.status.success() {
            return Vec::new();
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (series, rest) = l.split_once(" => ")?;
                let v = rest.split_whitespace().next()?.parse().ok()?;
                Some((series.to_owned(), v))
            })
            .collect()
    }

    /// Waits until `expr` has a value for which `ok` holds; returns it.
    async fn wait_for(&self, expr: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.query(expr);
            if let Some((_, v)) = got.iter().find(|(_, v)| ok(*v)) {
                return *v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus: {expr} never passed; last {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_metrics_and_they_count_what_happened() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    site.extra = upstream.uplink_section("gw-test", upstream.port, "");
    let mut consumer = upstream.consumer("hospital/#").await;
    let mut gw = site.start().await;
    gw.wait_log("uplink.connected", &[]).await;
    let metrics = gw.metrics.expect("a metrics address in the ready line");
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    for i in 0..5 {
        pump.publish(&format!("ward/pump-1/vitals/hr{i}"), b"72")
            .await;
    }
    for _ in 0..5 {
        consumer.next().await;
    }
    // A publish outside its ACL: a violation, the device disconnected.
    pump.client
        .publish(
            "ward/pump-2/vitals/hr",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"72".to_vec(),
        )
        .await
        .unwrap();
    pump.closed().await;
    // A certificate of the site that names no registered device: refused at CONNECT.
    site.issue("ghost");
    let (_c, eventloop) =
        rumqttc::AsyncClient::new(options("ghost", gw.port(), device_tls(&site, "ghost")), 8);
    expect_connack_refusal(eventloop, rumqttc::ConnectReturnCode::NotAuthorized).await;

    // The endpoint itself: OpenMetrics text, whole.
    let (code, head, body) = get(metrics, "/metrics").await;
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    // A real Prometheus scrapes it: `up` is 1 only if every line parsed.
    let prom = Prometheus::start(metrics).await;
    prom.wait_for("wardgate_messages_accepted_total", |v| v >= 5.0)
        .await;
    prom.wait_for("wardgate_uplink_delivered_records_total", |v| v >= 5.0)
        .await;
    prom.wait_for("wardgate_uplink_puback_latency_seconds_count", |v| v >= 5.0)
        .await;
    prom.wait_for(
        r#"wardgate_policy_events_total{kind="publish_denied"}"#,
        |v| v == 1.0,
    )
    .await;
    prom.wait_for(
        r#"wardgate_messages_refused_total{reason="publish_denied"}"#,
        |v| v == 1.0,
    )
    .await;
    prom.wait_for(
        r#"wardgate_connections_refused_total{reason="unregistered"}"#,
        |v| v == 1.0,
    )
    .await;
    prom.wait_for("wardgate_uplink_connected", |v| v == 1.0)
        .await;
    prom.wait_for("wardgate_devices_registered", |v| v == 3.0)
        .await;
    prom.wait_for("wardgate_ready", |v| v == 1.0).await;
    prom.wait_for("wardgate_process_resident_memory_bytes", |v| v > 1e6)
        .await;
    prom.wait_for(r#"wardgate_spool_records{priority="vital"}"#, |v| v == 0.0)
        .await;
    // No series per device unless asked for.
    assert!(prom.query(r#"{__name__=~"wardgate_device_.*"}"#).is_empty());
    let names = prom.query(r#"count by (__name__) ({job="wardgate"})"#);
    eprintln!("{} series names scraped", names.len());
    let _ = gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ready_only_while_messages_move_and_says_why_not() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, true).await;
    site.extra = upstream.uplink_section("gw-test", link.port, "");
    site.extra_admin = "stall_after = \"2s\"\n";
    let mut gw = site.start().await;
    gw.wait_log("uplink.connected", &[]).await;
    let metrics = gw.metrics.unwrap();
    let health = |want: u16, says: &'static str| async move {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (code, _, body) = get(metrics, "/health").await;
            if code == want && body.contains(says) {
                eprintln!("/health {code}: {}", body.trim());
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/health never {want} with {says:?}: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    health(200, r#""ready":true"#).await;

    // The broker stops answering: what is in flight is never acknowledged.
    link.set_stalled(true);
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals/hr", b"72").await;
    let body = health(503, "nothing was acknowledged").await;
    assert!(body.contains(r#""stalled":true"#), "{body}");
    // What waits is in the metrics: the vital reading, older than the stall limit.
    let (_, _, text) = get(metrics, "/metrics").await;
    let sample = |name| wardgate::demo::watch::sample(&text, name);
    assert!(
        sample(r#"wardgate_spool_records{priority="vital"}"#) >= 1.0,
        "{text}"
    );
    assert!(
        sample("wardgate_spool_oldest_record_age_seconds") >= 2.0,
        "{text}"
    );
    assert_eq!(sample("wardgate_ready"), 0.0, "{text}");
    assert_eq!(get(metrics, "/health/working").await.0, 503);
    let (_, status, _) = site.admin(&["status", "--json"]);
    assert!(status.contains("nothing was acknowledged"), "{status}");
    link.set_stalled(false);
    health(200, r#""ready":true"#).await;

    // The hospital network is cut: not ready, but not stalled (a restart would not help).
    link.set_up(false);
    let body = health(503, "the uplink is not connected").await;
    assert!(body.contains(r#""stalled":false"#), "{body}");
    // The gateway itself works: an update tried now is not rolled back for the outage.
    assert_eq!(get(metrics, "/health/working").await.0, 200);
    link.set_up(true);
    health(200, r#""ready":true"#).await;
    let _ = gw.stop().await;
}

/// The next datagram the gateway sends systemd, as text.
async fn notified(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, sock.recv(&mut buf))
        .await
        .expect("a notification in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_only_while_messages_move() {
    let mut site = Site::ward();
    let upstream = Upstream::start(&site.path("upstream"), "gw-test").await;
    let link = Link::start(upstream.port, true).await;
    site.extra = upstream.uplink_section("gw-test", link.port, "");
    site.extra_admin = "stall_after = \"2s\"\n";
    // systemd's side: the notification socket, and a 1 s watchdog (pings every 0.5 s).
    let path = site.path("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
    let usec = std::path::PathBuf::from("1000000");
    let mut gw = Gateway::start_with_env(
        &site.write_config(),
        &[
            ("NOTIFY_SOCKET", path.as_path()),
            ("WATCHDOG_USEC", usec.as_path()),
        ],
    )
    .await;
    assert!(notified(&sock).await.contains("READY=1"));
    gw.wait_log("uplink.connected", &[]).await;
    let sock = &sock;
    let until = |want: &'static str| async move {
        loop {
            let m = notified(sock).await;
            if m.contains(want) {
                return m;
            }
        }
    };
    let fed = until("WATCHDOG=1").await;
    assert!(
        fed.contains("STATUS=") && fed.contains("uplink connected"),
        "{fed}"
    );

    // Stuck: the broker takes what is sent and acknowledges nothing.
    link.set_stalled(true);
    let mut pump = Client::connect(&site, "pump-1", gw.port()).await;
    pump.publish("ward/pump-1/vitals/hr", b"72").await;
    gw.wait_log("gateway.stalled", &[]).await;
    // Drain what was sent before the verdict, then four status lines in a row (two
    // watchdog periods) without a ping.
    until("nothing was acknowledged").await;
    for _ in 0..4 {
        let m = notified(sock).await;
        assert!(!m.contains("WATCHDOG=1"), "fed while stalled: {m}");
        assert!(m.contains("not ready"), "{m}");
    }
    link.set_stalled(false);
    gw.wait_log("gateway.unstalled", &[]).await;
    until("WATCHDOG=1").await;
    let _ = gw.stop().await;
}
