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
