//! The core must stay sans-IO: no tokio, no std::fs/std::net, no clock, no threads, no
//! environment, no system calls (`nix`, `libc`).

use std::path::Path;

#[test]
fn core_imports_no_io_and_reads_no_clock() {
    let forbidden = [
        "tokio",
        "std::fs",
        "std::net",
        "std::time",
        "SystemTime",
        "Instant::now",
        "std::thread",
        "thread::",
        "std::process",
        "std::env",
        "env!",
        "nix::",
        "libc",
        "io_uring",
        "crate::shell",
        "crate::config",
        "rand::",
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut checked = 0;
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/core exists") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable source");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for f in forbidden {
                    assert!(
                        !code.contains(f),
                        "{}:{}: the core must not use `{f}`: {line}",
                        path.display(),
                        n + 1
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 5, "expected the core's modules, found {checked}");
}
