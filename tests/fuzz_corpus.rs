//! Replays the saved fuzz corpus through the same checks the fuzz targets run, so `cargo test` catches a change
//! that breaks a property the fuzzer once covered. docs/fuzzing.md describes the targets and the corpus.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

/// Returns the files of `fuzz/<kind>/<target>/`, sorted, or an empty list when the directory does not exist.
fn inputs_in(kind: &str, target: &str) -> Vec<PathBuf> {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&directory) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| {
            entry
                .unwrap_or_else(|error| panic!("failed to list {}: {error}", directory.display()))
                .path()
        })
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every corpus and regression input of `target` through `check`. Fails when the corpus is missing or
/// empty, so the test cannot pass without replaying anything.
fn replay(target: &str, check: fn(&[u8])) {
    let corpus = inputs_in("corpus", target);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is missing or empty; restore it from git or rebuild it as docs/fuzzing.md describes"
    );
    let regressions = inputs_in("regressions", target);

    // A check panics on the first property that fails. Catch each panic, so one run lists every failing input.
    // The panic hook has already printed each panic's message.
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path)
            .unwrap_or_else(|error| panic!("failed to read {}: {error}", path.display()));
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    println!(
        "{target}: replayed {} corpus and {} regression inputs, {} failed",
        corpus.len(),
        regressions.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} inputs failed the {target} check:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn envelope_corpus_passes() {
    replay("envelope", checks::envelope);
}

#[test]
fn token_corpus_passes() {
    replay("token", checks::token);
}

#[test]
fn client_frame_corpus_passes() {
    replay("client_frame", checks::client_frame);
}
