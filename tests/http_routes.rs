//! The health endpoint's answers for given resource states, without a socket.

use serde_json::{json, Value};
use tandem::shell::http::{request_path, respond};

fn st(role: &str, disk: &str, replication: &str, device: bool, phase: &str) -> Value {
    json!({
        "name": "r0", "node": "alpha", "role": role, "disk": disk,
        "replication": replication,
        "connection": if replication == "off" { "connecting" } else { "connected" },
        "device": if device { json!("/dev/tandem/r0") } else { Value::Null },
        "services": {"phase": phase}, "quorum": true, "term": 3,
        "out_of_sync_bytes": 8192, "resync": {"bytes_per_sec": 0},
        "writes_in_flight": 2, "lease_ms_left": 1500,
        "app_writes": {"completed": 10, "latency_us_sum": 5000},
    })
}

#[test]
fn primary_and_replica_checks() {
    // (status, path, code)
    let serving = st("primary", "uptodate", "established", true, "running");
    let starting = st("primary", "uptodate", "established", true, "starting");
    let no_device = st("primary", "uptodate", "established", false, "running");
    let replica = st("secondary", "uptodate", "established", false, "idle");
    let outdated = st("secondary", "outdated", "off", false, "idle");
    let rows = [
        (&serving, "/primary", 200),
        (&serving, "/primary/r0", 200),
        (&serving, "/primary/nope", 404),
        (&serving, "/replica", 503),
        (&starting, "/primary", 503),
        (&no_device, "/primary", 503),
        (&replica, "/primary", 503),
        (&replica, "/replica", 200),
        (&replica, "/replica?lag=1MB", 200),
        (&outdated, "/replica", 503),
        (&serving, "/health", 200),
        (&serving, "/nothing", 404),
    ];
    for (s, path, code) in rows {
        let r = respond(path, std::slice::from_ref(s));
        assert_eq!(
            r.code, code,
            "{path} for role {} phase {}",
            s["role"], s["services"]["phase"]
        );
    }
}

#[test]
fn metrics_in_prometheus_text() {
    let r = respond(
        "/metrics",
        &[st("primary", "uptodate", "established", true, "running")],
    );
    assert_eq!(r.code, 200);
    for line in [
        "# TYPE tandem_role_primary gauge",
        "tandem_role_primary{resource=\"r0\",node=\"alpha\"} 1",
        "tandem_serving{resource=\"r0\",node=\"alpha\"} 1",
        "tandem_term{resource=\"r0\",node=\"alpha\"} 3",
        "tandem_out_of_sync_bytes{resource=\"r0\",node=\"alpha\"} 8192",
        "tandem_writes_in_flight{resource=\"r0\",node=\"alpha\"} 2",
        "tandem_lease_seconds_left{resource=\"r0\",node=\"alpha\"} 1.5",
        "tandem_write_latency_seconds_count{resource=\"r0\",node=\"alpha\"} 10",
        "tandem_write_latency_seconds_sum{resource=\"r0\",node=\"alpha\"} 0.005",
    ] {
        assert!(
            r.body.lines().any(|l| l == line),
            "{line} missing in\n{}",
            r.body
        );
    }
}

#[test]
fn request_lines() {
    assert_eq!(
        request_path("GET /primary HTTP/1.1\r\nHost: x\r\n\r\n"),
        Some("/primary")
    );
    assert_eq!(
        request_path("HEAD /health HTTP/1.0\r\n\r\n"),
        Some("/health")
    );
    assert_eq!(request_path("POST /primary HTTP/1.1\r\n\r\n"), None);
    assert_eq!(request_path("GET /primary\r\n\r\n"), None);
    assert_eq!(request_path(""), None);
}
