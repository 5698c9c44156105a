//! The health and metrics endpoint (`[global] http-listen`), for HAProxy checks and
//! Prometheus as Patroni's REST API serves them:
//!
//! - `GET /primary` (or `/primary/RES`): 200 only on a node that is primary with its
//!   services running, for every resource it serves (or for RES); else 503.
//! - `GET /replica` (or `/replica/RES`): 200 on an up-to-date secondary connected to its
//!   primary; else 503.
//! - `GET /health`: 200 with every resource's status as JSON while the daemon answers.
//! - `GET /metrics`: Prometheus text format.
//!
//! [`respond`] maps a path and the resources' status ([`ResourceStatus`]) to a response;
//! it does no I/O, so the routing rules are tested without a socket.

use crate::core::resource::{DiskState, Link, Role};
use crate::shell::status::ResourceStatus;

pub struct Response {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

fn text(code: u16, body: impl Into<String>) -> Response {
    Response {
        code,
        content_type: "text/plain; charset=utf-8",
        body: body.into(),
    }
}

/// The response for `GET path` given the status of every resource this node serves.
pub fn respond(path: &str, statuses: &[ResourceStatus]) -> Response {
    let path = path.split('?').next().unwrap_or(path);
    let mut parts = path.trim_matches('/').splitn(2, '/');
    let route = parts.next().unwrap_or("");
    let only = parts.next();
    let chosen: Vec<&ResourceStatus> = statuses
        .iter()
        .filter(|s| only.is_none_or(|r| s.core.name == r))
        .collect();
    let check = |ok: fn(&ResourceStatus) -> bool, what: &str| {
        if chosen.is_empty() {
            return text(404, format!("no such resource: {}\n", only.unwrap_or("")));
        }
        if chosen.iter().all(|s| ok(s)) {
            text(200, format!("{what}\n"))
        } else {
            text(503, format!("not {what}\n"))
        }
    };
    match route {
        "primary" | "master" | "leader" => check(ResourceStatus::serving_primary, "primary"),
        "replica" => check(ResourceStatus::healthy_replica, "replica"),
        "health" if only.is_none() => Response {
            code: 200,
            content_type: "application/json",
            body: serde_json::to_string(statuses).unwrap_or_default() + "\n",
        },
        "metrics" if only.is_none() => Response {
            code: 200,
            content_type: "text/plain; version=0.0.4",
            body: metrics(statuses),
        },
        _ => text(
            404,
            "unknown path: use /primary, /replica, /health or /metrics\n",
        ),
    }
}

/// Prometheus text exposition of the resources' status.
pub fn metrics(statuses: &[ResourceStatus]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, kind: &str, rows: Vec<(String, f64)>| {
        out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (labels, v) in rows {
            out += &format!("{name}{{{labels}}} {v}\n");
        }
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let each = |f: &dyn Fn(&ResourceStatus) -> f64| -> Vec<(String, f64)> {
        statuses
            .iter()
            .map(|s| {
                (
                    format!("resource=\"{}\",node=\"{}\"", s.core.name, s.node),
                    f(s),
                )
            })
            .collect()
    };
    family(
        "tandem_role_primary",
        "1 if this node is primary for the resource.",
        "gauge",
        each(&|s| flag(s.core.role == Role::Primary)),
    );
    family(
        "tandem_serving",
        "1 if primary with its services running (what /primary answers 200 for).",
        "gauge",
        each(&|s| flag(s.serving_primary())),
    );
    family(
        "tandem_disk_up_to_date",
        "1 if the local disk is up to date.",
        "gauge",
        each(&|s| flag(s.core.disk == DiskState::UpToDate)),
    );
    family(
        "tandem_peer_connected",
        "1 if the replication link is established.",
        "gauge",
        each(&|s| flag(s.core.connection == Link::Connected)),
    );
    family(
        "tandem_quorum",
        "1 if the node has quorum.",
        "gauge",
        each(&|s| flag(s.core.quorum)),
    );
    family(
        "tandem_degraded",
        "1 if the pair is connected but its witness does not work (no failover possible).",
        "gauge",
        each(&|s| flag(s.core.degraded)),
    );
    family(
        "tandem_witness_problem",
        "1 if the witness is unreachable, refuses what the node needs, or is behind the pair's term (status: witness.problem).",
        "gauge",
        each(&|s| flag(s.core.witness.problem.is_some())),
    );
    family(
        "tandem_disk_errors_total",
        "Requests the backing disk failed since the daemon started.",
        "counter",
        each(&|s| s.core.disk_errors as f64),
    );
    family(
        "tandem_term",
        "The highest term this node has seen.",
        "gauge",
        each(&|s| s.core.term as f64),
    );
    family(
        "tandem_lease_seconds_left",
        "Time left on the primary's witness lease.",
        "gauge",
        each(&|s| s.core.lease_ms_left as f64 / 1000.0),
    );
    family(
        "tandem_out_of_sync_bytes",
        "Bytes marked out of sync in the bitmap.",
        "gauge",
        each(&|s| s.core.out_of_sync_bytes as f64),
    );
    family(
        "tandem_resync_bytes_per_second",
        "Current resync rate.",
        "gauge",
        each(&|s| s.core.resync.bytes_per_sec as f64),
    );
    family(
        "tandem_writes_in_flight",
        "Application writes not yet completed.",
        "gauge",
        each(&|s| s.core.writes_in_flight as f64),
    );
    family(
        "tandem_flushes_in_flight",
        "Application flushes not yet completed.",
        "gauge",
        each(&|s| s.core.flushes_in_flight as f64),
    );
    family(
        "tandem_write_latency_seconds_sum",
        "Sum of application write latencies (arrival to completion, incl. the peer's ack).",
        "counter",
        each(&|s| s.app_writes.latency_us_sum as f64 / 1e6),
    );
    family(
        "tandem_write_latency_seconds_count",
        "Application writes completed.",
        "counter",
        each(&|s| s.app_writes.completed as f64),
    );
    out
}

/// The request path of an HTTP/1.x request head, if it is a GET.
pub fn request_path(head: &str) -> Option<&str> {
    let line = head.lines().next()?;
    let mut w = line.split_whitespace();
    let (method, path, version) = (w.next()?, w.next()?, w.next()?);
    (matches!(method, "GET" | "HEAD") && version.starts_with("HTTP/1.")).then_some(path)
}

pub fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "",
    }
}
