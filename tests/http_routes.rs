//! The health endpoint's answers for given resource states, without a socket. The states
//! are the typed status the daemon serves, made from a real core's status: a field the
//! routes read cannot be renamed without this failing to compile.

mod core_support;

use tandem::core::promoter::Phase;
use tandem::core::resource::{DiskState, Link, Replication, Role};
use tandem::core::Protocol;
use tandem::shell::http::{request_path, respond};
use tandem::shell::status::{AppWrites, IoBackend, ResourceStatus, ServicesStatus};

fn st(
    role: Role,
    disk: DiskState,
    replication: Replication,
    device: bool,
    phase: Phase,
) -> ResourceStatus {
    let o = core_support::One::new(Protocol::C);
    let mut core = o.r.status();
    core.role = role;
    core.disk = disk;
    core.replication = replication;
    core.connection = if replication == Replication::Off {
        Link::Connecting
    } else {
        Link::Connected
    };
    core.term = 3;
    core.out_of_sync_bytes = 8192;
    core.writes_in_flight = 2;
    core.lease_ms_left = 1500;
    ResourceStatus {
        core,
        node: "alpha".into(),
        device: device.then(|| "/dev/tandem/r0".into()),
        backing_disk: "/dev/vdb".into(),
        io_backend: IoBackend::IoUring,
        app_writes: AppWrites {
            completed: 10,
            latency_us_sum: 5000,
        },
        services: ServicesStatus {
            phase,
            last_failure: None,
            list: Vec::new(),
        },
    }
}

#[test]
fn primary_and_replica_checks() {
    // (status, path, code)
    use DiskState::{Outdated, UpToDate};
    use Replication::{Established, Off};
    let serving = st(Role::Primary, UpToDate, Established, true, Phase::Running);
    let starting = st(Role::Primary, UpToDate, Established, true, Phase::Starting);
    let no_device = st(Role::Primary, UpToDate, Established, false, Phase::Running);
    let replica = st(Role::Secondary, UpToDate, Established, false, Phase::Idle);
    let outdated = st(Role::Secondary, Outdated, Off, false, Phase::Idle);
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
            "{path} for role {:?} phase {:?}",
            s.core.role, s.services.phase
        );
    }
}

#[test]
fn metrics_in_prometheus_text() {
    let r = respond(
        "/metrics",
        &[st(
            Role::Primary,
            DiskState::UpToDate,
            Replication::Established,
            true,
            Phase::Running,
        )],
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

#[test]
fn metrics_show_a_witness_problem_and_disk_errors() {
    let mut s = st(
        Role::Primary,
        DiskState::UpToDate,
        Replication::Established,
        true,
        Phase::Running,
    );
    let line = |body: &str, name: &str| {
        body.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
    };
    let body = respond("/metrics", std::slice::from_ref(&s)).body;
    assert_eq!(line(&body, "tandem_witness_problem").as_deref(), Some("0"));
    s.core.witness.problem = Some("refused Renew: witness restarted".into());
    s.core.degraded = true;
    s.core.disk_errors = 4;
    s.core.flushes_in_flight = 1;
    let body = respond("/metrics", std::slice::from_ref(&s)).body;
    for (name, want) in [
        ("tandem_witness_problem", "1"),
        ("tandem_degraded", "1"),
        ("tandem_disk_errors_total", "4"),
        ("tandem_flushes_in_flight", "1"),
    ] {
        assert_eq!(
            line(&body, name).as_deref(),
            Some(want),
            "{name} in\n{body}"
        );
    }
}
