//! Every input the fuzzer ever found a crash with (`fuzz/regressions/TARGET/`), replayed
//! against the same entry points on stable (`tandem::fuzz`), plus a short deterministic
//! run of random inputs per target, so a decoder that panics on bad bytes fails here
//! even where the nightly fuzzer does not run.

use std::path::Path;

use tandem::core::SplitMix64;

#[test]
fn every_kept_crash_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    for (name, f) in tandem::fuzz::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        for entry in dir.flatten() {
            let bytes = std::fs::read(entry.path()).expect("regression input");
            let path = entry.path().display().to_string();
            let r = std::panic::catch_unwind(|| f(&bytes));
            assert!(r.is_ok(), "{name}: {path} panics again");
            replayed += 1;
        }
    }
    // The directory holds the crash inputs of the defects issue (a crafted superblock,
    // the last term, a short FUSE request, ...): at least those.
    assert!(
        replayed >= 5,
        "only {replayed} regression inputs found under {root:?}"
    );
}

#[test]
fn random_inputs_never_panic_a_decoder() {
    for (name, f) in tandem::fuzz::TARGETS {
        let mut rng = SplitMix64(0x5EED ^ name.len() as u64);
        for i in 0..300u64 {
            let len = (rng.below(4) * rng.below(3000)) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            // Some inputs are mostly zeros: nearer to valid headers.
            if i % 3 == 0 {
                for x in b.iter_mut().skip(28) {
                    if rng.below(4) != 0 {
                        *x = 0;
                    }
                }
            }
            let r = std::panic::catch_unwind(|| f(&b));
            assert!(r.is_ok(), "{name}: input {i} ({len} bytes) panics");
        }
    }
}
