//! The core must stay sans-IO: no tokio, no std::fs/std::net, no clock, no threads.

use std::path::Path;

#[test]
fn core_imports_no_io_and_reads_no_clock() {
    let forbidden = [
        "tokio",
        "std::fs",
        "std::net",
        "std::time",
        "SystemTime",
        "std::thread",
        "std::process",
        "io_uring",
        "crate::shell",
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/core");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("src/core exists") {
        let path = entry.expect("dir entry").path();
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
    assert!(checked >= 5, "expected the core's modules, found {checked}");
}
