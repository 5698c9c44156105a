//! End to end: a real `tandem-witness` in its own network namespace, asked by clients
//! inside the data nodes' namespaces. Terms, leases, the up-to-date set, persistence
//! across restarts, and refusals (wrong secret, replayed term, corrupt state file).

mod common;

use std::time::Duration;

use common::{Cluster, Opts, SECRET};
use tandem::core::witness::{Op, Reply, Request};
use tandem::shell::net::WitnessClient;

const LEASE_MS: u64 = 600;

/// One request to the witness from inside node `i`'s namespace.
fn ask(c: &Cluster, i: usize, op: Op, term: u64, peer: &str) -> Reply {
    ask_with(c, i, op, term, peer, SECRET.as_bytes().to_vec()).expect("witness call")
}

fn ask_with(
    c: &Cluster,
    i: usize,
    op: Op,
    term: u64,
    peer: &str,
    secret: Vec<u8>,
) -> Result<Reply, String> {
    let addr: std::net::SocketAddr = c.witness_addr.parse().expect("addr");
    let node = c.nodes[i].name.clone();
    let peer = peer.to_string();
    common::in_netns(&c.nodes[i].ns.clone(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let mut w = WitnessClient::connect(addr, &secret, &node)
                .await
                .map_err(|e| e.to_string())?;
            w.call(Request {
                op,
                resource: "r0".into(),
                term,
                peer,
                uptodate: true,
                seq: 0,
            })
            .await
            .map_err(|e| e.to_string())
        })
    })
}

#[test]
fn witness_terms_leases_and_persistence() {
    let mut c = Cluster::new("witness", Opts::default());
    c.add_witness(LEASE_MS);
    c.start_witness();

    // Just started: nothing is granted for one lease period.
    let r = ask(&c, 0, Op::Promote, 0, "");
    assert!(!r.granted && r.reason.contains("restarted"), "{r:?}");
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));

    let r = ask(&c, 0, Op::Promote, 0, "");
    assert!(r.granted && r.term == 1 && r.primary == "alpha", "{r:?}");
    assert!(ask(&c, 0, Op::Renew, 1, "").granted);
    // The lease runs: the other node is refused.
    let r = ask(&c, 1, Op::Promote, 1, "");
    assert!(!r.granted && r.reason.contains("lease"), "{r:?}");
    // Resource-level fencing: alpha records beta as outdated.
    assert!(ask(&c, 0, Op::Outdate, 1, "beta").granted);
    // Even after the lease ran out, an outdated node is not promoted.
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));
    let r = ask(&c, 1, Op::Promote, 1, "");
    assert!(!r.granted && r.reason.contains("up-to-date"), "{r:?}");
    // After its resync the primary marks it up to date again; now it may take over.
    assert!(ask(&c, 0, Op::UpToDate, 1, "beta").granted);
    let r = ask(&c, 1, Op::Promote, 1, "");
    assert!(r.granted && r.term == 2 && r.primary == "beta", "{r:?}");
    // The old primary replaying its term is refused.
    let r = ask(&c, 0, Op::Renew, 1, "");
    assert!(
        !r.granted && r.term == 2 && r.reason.contains("stale"),
        "{r:?}"
    );

    // Restart: the state survived, and the grace period starts again.
    c.stop_witness();
    c.start_witness();
    let r = ask(&c, 0, Op::Query, 0, "");
    assert_eq!((r.term, r.primary.as_str()), (2, "beta"), "{r:?}");
    let r = ask(&c, 1, Op::Renew, 2, "");
    assert!(!r.granted && r.reason.contains("restarted"), "{r:?}");
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));
    assert!(ask(&c, 1, Op::Renew, 2, "").granted);

    // A wrong secret is refused.
    let r = ask_with(
        &c,
        0,
        Op::Query,
        0,
        "",
        b"wrong-secret-wrong-secret".to_vec(),
    );
    assert!(r.is_err(), "wrong secret accepted: {r:?}");

    // A corrupt state file stops the witness with a clear error, never a silent reset.
    c.stop_witness();
    let f = c.witness_state_file();
    let mut b = std::fs::read(&f).expect("state");
    let last = b.len() - 1;
    b[last] ^= 0xff;
    std::fs::write(&f, &b).expect("corrupt");
    let e = c.witness_start_fails();
    assert!(
        e.contains("checksum") && e.contains("refusing to start"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&f).expect("state"),
        b,
        "the corrupt file was rewritten"
    );
}
