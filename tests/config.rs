//! Config parsing: a good file loads; each kind of mistake names its key and the file.

use tandem::config::Config;

const GOOD: &str = r#"
[global]
secret-file = "/etc/tandem/secret"
run-dir = "/run/tandem"

[resource.pg]
protocol = "C"
on-no-quorum = "suspend-io"
fencing = "resource"
witness = "10.0.0.3:7790"

[[resource.pg.node]]
name = "alpha"
address = "10.0.0.1:7789"
disk = "/dev/vdb"

[[resource.pg.node]]
name = "beta"
address = "10.0.0.2:7789"
disk = "/dev/vdb"
device = "/dev/tandem/pg-beta"
"#;

#[test]
fn stonith_with_a_handler_loads() {
    let text = GOOD.replace(
        "fencing = \"resource\"",
        "fencing = \"stonith\"\nfence-peer = \"/usr/lib/tandem/fence ipmi\"",
    );
    let c = Config::parse(&text, "t.toml").expect("valid");
    let r = c.resource("pg").expect("pg");
    assert_eq!(r.fencing, tandem::core::quorum::Fencing::Stonith);
    assert_eq!(r.fence_peer.as_deref(), Some("/usr/lib/tandem/fence ipmi"));
    assert_eq!(r.fence_peer_timeout_ms, 60_000);
}

#[test]
fn services_load_in_order() {
    let text = GOOD.to_string()
        + r#"
[[resource.pg.service]]
type = "mount"
mount-point = "/var/lib/postgresql"
options = "noatime"

[[resource.pg.service]]
type = "systemd"
unit = "postgresql@15-main.service"
stop-timeout-ms = 120000

[[resource.pg.service]]
type = "vip"
address = "10.0.0.10/24"
interface = "eth0"
"#;
    let c = Config::parse(&text, "t.toml").expect("valid");
    let r = c.resource("pg").expect("pg");
    let names: Vec<String> = r.services.iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        [
            "mount /var/lib/postgresql",
            "systemd postgresql@15-main.service",
            "vip 10.0.0.10/24 on eth0"
        ]
    );
    assert_eq!(r.services[1].stop_timeout_ms, 120_000);
    assert_eq!(r.services[0].start_timeout_ms, 60_000);
}

#[test]
fn good_config_loads() {
    let c = Config::parse(GOOD, "t.toml").expect("valid");
    let r = c.resource("pg").expect("pg");
    assert_eq!(r.protocol, tandem::core::Protocol::C);
    let (me, peer) = r.local_and_peer("beta").expect("beta is a node");
    assert_eq!(me.device.to_str(), Some("/dev/tandem/pg-beta"));
    assert_eq!(peer.device.to_str(), Some("/dev/tandem/pg"));
    assert_eq!(peer.address.port(), 7789);
}

fn err(text: &str) -> String {
    Config::parse(text, "t.toml")
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn mistakes_name_key_and_file() {
    let cases = [
        (
            GOOD.replace("protocol = \"C\"", "protocol = \"D\""),
            "resource.pg.protocol",
        ),
        (
            GOOD.replace("fencing = \"resource\"", "fencing = \"maybe\""),
            "resource.pg.fencing",
        ),
        (
            GOOD.replace("10.0.0.1:7789", "10.0.0.1"),
            "resource.pg.node[0].address",
        ),
        (
            GOOD.replace("disk = \"/dev/vdb\"\n\n", "disk = \"\"\n\n"),
            "resource.pg.node[0].disk",
        ),
        (GOOD.replace("run-dir", "rundir"), "unknown field `rundir`"),
        (
            GOOD.replace("on-no-quorum = \"suspend-io\"", "on-no-quorum = \"panic\""),
            "resource.pg.on-no-quorum",
        ),
        (
            GOOD.replace("name = \"beta\"", "name = \"alpha\""),
            "both nodes are named",
        ),
        (
            GOOD.replace("witness = \"10.0.0.3:7790\"\n", ""),
            "resource-level fencing needs a `witness`",
        ),
        (
            GOOD.replace("fencing = \"resource\"", "fencing = \"stonith\""),
            "resource.pg.fence-peer: fencing = \"stonith\" needs a fence-peer handler",
        ),
        (
            GOOD.replace("fencing = \"resource\"", "fence-peer = \"/bin/true\""),
            "resource.pg.fence-peer: is only run with fencing = \"stonith\"",
        ),
        (
            GOOD.replace(
                "fencing = \"resource\"",
                "fencing = \"stonith\"\nfence-peer = \"x\"\nfence-peer-timeout-ms = 5",
            ),
            "resource.pg.fence-peer-timeout-ms",
        ),
        (
            GOOD.replace("on-no-quorum", "promote-margin-ms = 1\non-no-quorum"),
            "promote-margin-ms 1 is too small",
        ),
        (
            GOOD.replace("run-dir", "watchdog-timeout-s = 1\nrun-dir"),
            "global.watchdog-timeout-s",
        ),
        (
            GOOD.to_string() + "\n[[resource.pg.service]]\ntype = \"nfs\"\n",
            "resource.pg.service[0].type",
        ),
        (
            GOOD.to_string() + "\n[[resource.pg.service]]\ntype = \"mount\"\n",
            "resource.pg.service[0].mount-point: missing",
        ),
        (
            GOOD.to_string()
                + "\n[[resource.pg.service]]\ntype = \"vip\"\naddress = \"10.0.0.5\"\ninterface = \"eth0\"\n",
            "resource.pg.service[0].address",
        ),
        (
            GOOD.replace("on-no-quorum", "on-demote-failure = \"panic\"\non-no-quorum"),
            "resource.pg.on-demote-failure",
        ),
        (
            GOOD.replace("on-no-quorum", "preferred-node = \"gamma\"\non-no-quorum"),
            "resource.pg.preferred-node",
        ),
        (
            GOOD.replace("on-no-quorum", "fail-back = true\non-no-quorum"),
            "resource.pg.fail-back: needs a preferred-node",
        ),
        (
            GOOD.replace("10.0.0.2:7789", "10.0.0.1:7789"),
            "both nodes have the address 10.0.0.1:7789",
        ),
        (
            GOOD.replace("name = \"beta\"", &format!("name = \"{}\"", "b".repeat(64))),
            "resource.pg.node[1].name",
        ),
        (
            GOOD.replace("name = \"beta\"", "name = \"beta gamma\""),
            "node names are 1-63 characters",
        ),
        (
            GOOD.replace("on-no-quorum", "al-extents = 1\non-no-quorum"),
            "resource.pg.al-extents: must be 7..=1019",
        ),
        (
            GOOD.replace(
                "on-no-quorum",
                "ping-timeout-ms = 9223372036854775807\non-no-quorum",
            ),
            "resource.pg.ping-timeout-ms: 9223372036854775807 is more than 3600000",
        ),
        (
            GOOD.replace("on-no-quorum", "lease-ms = 9000000000\non-no-quorum"),
            "resource.pg.lease-ms",
        ),
        ("[global]\n".to_string(), "no resource defined"),
        ("this is not toml".to_string(), "t.toml"),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(e.contains(want), "expected {want:?} in {e:?}");
        assert!(e.contains("t.toml"), "file name missing in {e:?}");
    }
}

#[test]
fn missing_disk_is_refused_for_this_node() {
    let c =
        Config::parse(&GOOD.replace("/dev/vdb", "/nonexistent/disk"), "t.toml").expect("parses");
    let e = c.check_node("alpha").expect_err("disk missing").to_string();
    assert!(
        e.contains("resource.pg.node.disk") && e.contains("/nonexistent/disk"),
        "{e}"
    );
    let e = c.check_node("gamma").expect_err("unknown node").to_string();
    assert!(e.contains("gamma"), "{e}");
}
