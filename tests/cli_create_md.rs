//! `tandemctl create-md` / `show-md` against real backing files.

use std::path::{Path, PathBuf};
use std::process::Command;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tandem-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let disk = dir.join("alpha.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(32 << 20))
        .expect("disk file");
    let cfg = dir.join("tandem.toml");
    std::fs::write(
        &cfg,
        format!(
            "[resource.pg]\n[[resource.pg.node]]\nname = \"alpha\"\naddress = \"127.0.0.1:7789\"\ndisk = \"{}\"\n[[resource.pg.node]]\nname = \"beta\"\naddress = \"127.0.0.1:7790\"\ndisk = \"{}\"\n",
            disk.display(),
            dir.join("beta.img").display()
        ),
    )
    .expect("config");
    (cfg, disk)
}

fn ctl(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tandemctl"))
        .arg("--config")
        .arg(cfg)
        .args(["--node", "alpha"])
        .args(args)
        .output()
        .expect("run tandemctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn create_md_then_refuse_overwrite_and_corruption() {
    let dir = TempDir::new("md");
    let (cfg, disk) = setup(&dir.0);
    let (code, out, err) = ctl(&cfg, &["create-md", "pg"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = ctl(&cfg, &["show-md", "pg"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["resource"], "pg");
    assert_eq!(v["current_uuid"], "0000000000000004");
    assert!(v["data_bytes"].as_u64().expect("size") > 31 << 20);

    let (code, _, err) = ctl(&cfg, &["create-md", "pg"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("already holds Tandem metadata") && err.contains("--force"),
        "{err}"
    );

    // Corrupt one byte of the superblock (last 4 KiB of the file).
    let mut bytes = std::fs::read(&disk).expect("read disk");
    let n = bytes.len();
    bytes[n - 4096 + 75] ^= 0x40;
    std::fs::write(&disk, &bytes).expect("write disk");
    let (code, _, err) = ctl(&cfg, &["show-md", "pg"]);
    assert_eq!(code, 1);
    assert!(err.contains("corrupt"), "{err}");
    let (code, _, err) = ctl(&cfg, &["create-md", "pg"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("refusing to overwrite a corrupt superblock"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");
    let (code, _, err) = ctl(&cfg, &["create-md", "pg", "--force", "--assume-clean"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = ctl(&cfg, &["show-md", "pg"]);
    assert!(out.contains("\"consistent\""), "{out}");
}

#[test]
fn bad_config_and_bad_arguments() {
    let dir = TempDir::new("badcfg");
    let cfg = dir.0.join("bad.toml");
    std::fs::write(&cfg, "[resource.pg]\nprotocol = \"Z\"\n").expect("write");
    let (code, _, err) = ctl(&cfg, &["create-md", "pg"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bad.toml") && err.contains("resource.pg.protocol"),
        "{err}"
    );
    let (code, _, _) = ctl(&cfg, &["no-such-command"]);
    assert_eq!(code, 2, "usage errors exit 2");
}

/// A superblock that passes its CRC but whose offsets lie: refused with one clear line
/// by `show-md` and `create-md`, never an abort or a huge allocation.
#[test]
fn crafted_superblock_with_huge_offsets_is_refused() {
    use tandem::core::meta::{Layout, Superblock};
    let dir = TempDir::new("crafted");
    let (cfg, disk) = setup(&dir.0);
    let size = 32u64 << 20;
    let sb_at = size - 4096;
    let good = Layout::compute(size, 4096, 16).expect("layout");
    let crafted = [
        Layout {
            bitmap_offset: u64::MAX - 10,
            ..good
        },
        Layout {
            al_offset: u64::MAX - 4096,
            ..good
        },
        Layout {
            al_slots: u64::MAX / 2,
            ..good
        },
        Layout {
            data_bytes: 2 << 50,
            ..good
        },
    ];
    for layout in crafted {
        let sb = Superblock::fresh(layout, "pg", "alpha", 4 << 20, 256, None);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("disk");
        std::os::unix::fs::FileExt::write_all_at(&f, &sb.encode(), sb_at).expect("write");
        for args in [&["show-md", "pg"][..], &["create-md", "pg"][..]] {
            let (code, _, err) = ctl(&cfg, args);
            assert_eq!(code, 1, "{args:?} on {layout:?}: {err}");
            assert!(err.contains("do not fit"), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
    // --force rewrites it (a deliberate choice), without reading the lying offsets.
    let (code, _, err) = ctl(&cfg, &["create-md", "pg", "--force"]);
    assert_eq!(code, 0, "{err}");
}

/// Metadata lives at the end: a disk that grew or shrank is reported as resized (or as
/// possibly shrunk), never only as "no metadata, run create-md".
#[test]
fn a_resized_disk_is_reported_as_resized() {
    let dir = TempDir::new("resized");
    let (cfg, disk) = setup(&dir.0);
    let (code, _, err) = ctl(&cfg, &["create-md", "pg"]);
    assert_eq!(code, 0, "{err}");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("disk");
    f.set_len(48 << 20).expect("grow");
    for args in [&["show-md", "pg"][..], &["create-md", "pg"][..]] {
        let (code, _, err) = ctl(&cfg, args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains("resized") && err.contains("33554432") && err.contains("50331648"),
            "{args:?}: {err}"
        );
    }
    f.set_len(32 << 20).expect("back");
    let (code, _, err) = ctl(&cfg, &["show-md", "pg"]);
    assert_eq!(code, 0, "the old size brings the metadata back: {err}");
    f.set_len(16 << 20).expect("shrink");
    let (code, _, err) = ctl(&cfg, &["show-md", "pg"]);
    assert_eq!(code, 1);
    assert!(err.contains("shrunk"), "{err}");
}
