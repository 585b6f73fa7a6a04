//! Replays every fuzz input kept in the repository through its harness on
//! stable Rust: the saved crashes in `fuzz/regressions/TARGET/` (each one a
//! bug that was fixed) and the minimised corpora in `fuzz/corpus/TARGET/`.
//! A harness that panics fails this test, so a fixed crash cannot come back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use qimg_tests::fuzzing::TARGETS;
use qimg_tests::workspace_root;

fn replay(dir: &Path, run: fn(&[u8])) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in files {
        if f.is_file() {
            let data = std::fs::read(&f).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "fuzz input {} panics its harness", f.display());
            n += 1;
        }
    }
    n
}

#[test]
fn every_kept_fuzz_input_runs_clean() {
    let root = workspace_root().join("fuzz");
    for (name, run) in TARGETS {
        let corpus = replay(&root.join("corpus").join(name), *run);
        let crashes = replay(&root.join("regressions").join(name), *run);
        assert!(
            corpus > 0,
            "fuzz/corpus/{name} is empty: run `cargo xtask fuzz` and commit the minimised corpus"
        );
        println!("{name}: {corpus} corpus inputs, {crashes} saved crashes replayed");
    }
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let manifest = std::fs::read_to_string(workspace_root().join("fuzz/Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
        let src = workspace_root().join(format!("fuzz/fuzz_targets/{name}.rs"));
        let text = std::fs::read_to_string(&src).unwrap();
        assert!(
            text.contains(&format!("fuzzing::{name}(")),
            "{} calls another harness",
            src.display()
        );
    }
}
