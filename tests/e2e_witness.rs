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
                force: false,
                primary: false,
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

    // Unauthenticated connections claiming 1 MiB frames cost the witness no such
    // buffers, and at most 64 are in their handshake at once.
    let pid = c.witness_child.as_ref().expect("witness").id();
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS")
    };
    let rss0 = rss();
    let addr: std::net::SocketAddr = c.witness_addr.parse().expect("addr");
    let header = tandem::core::wire::Msg::Data {
        seq: 1,
        epoch: 1,
        offset: 0,
        len: 1 << 20,
    }
    .encode(0, &vec![0u8; 1 << 20])[..tandem::core::wire::HEADER_BYTES]
        .to_vec();
    let held = common::in_netns(&c.nodes[0].ns.clone(), move || {
        use std::io::Write;
        // Every other one stalls inside its header and holds its handshake slot.
        (0..500)
            .filter_map(|_| std::net::TcpStream::connect(addr).ok())
            .enumerate()
            .map(|(i, mut s)| {
                let n = if i % 2 == 0 { header.len() } else { 10 };
                let _ = s.write_all(&header[..n]);
                s
            })
            .collect::<Vec<_>>()
    });
    common::wait_until(10, "the handshake limit logged", || {
        std::fs::read_to_string(c.dir.join("witness/witness.log"))
            .unwrap_or_default()
            .contains("too many connections in their handshake")
    });
    assert!(
        rss() < rss0 + 32 * 1024,
        "witness from {rss0} to {} KiB",
        rss()
    );
    drop(held);

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

/// A witness whose state cannot be written grants nothing: it refuses to start when the
/// state directory is not writable, and refuses a change it could not store, leaving its
/// state as it was, so no term is ever granted twice.
#[test]
fn a_witness_grants_nothing_it_cannot_store() {
    let mut c = Cluster::new("witness-ro", Opts::default());
    c.add_witness(LEASE_MS);
    let state_dir = c.witness_state_file().parent().expect("dir").to_path_buf();
    std::fs::create_dir_all(&state_dir).expect("state dir");
    common::sh(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1M,ro", "tmpfs"])
            .arg(&state_dir),
    );
    c.track_mount(state_dir.clone());
    let e = c.witness_start_fails();
    assert!(
        e.contains("cannot write the state file") && e.contains("Read-only"),
        "{e}"
    );

    let remount = |opt: &str| {
        common::sh(
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,{opt}")])
                .arg(&state_dir),
        );
    };
    remount("rw");
    c.start_witness();
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));
    remount("ro");
    // Alpha asks twice (a retry after no answer): refused both times, naming the cause,
    // and the term stays 0.
    for _ in 0..2 {
        let r = ask(&c, 0, Op::Promote, 0, "");
        assert!(
            !r.granted && r.term == 0 && r.reason.contains("Read-only"),
            "{r:?}"
        );
    }
    assert_eq!(ask(&c, 1, Op::Query, 0, "").term, 0);

    // Restarted on a writable directory: the first grant is term 1, to whoever asks.
    c.stop_witness();
    remount("rw");
    c.start_witness();
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));
    let r = ask(&c, 1, Op::Promote, 0, "");
    assert!(r.granted && r.term == 1 && r.primary == "beta", "{r:?}");
    let r = ask(&c, 0, Op::Promote, 1, "");
    assert!(!r.granted && r.term == 1, "{r:?}");
}
