//! The man pages in man/ and the shell completions in completions/ are generated from the clap definitions.
//! This test regenerates them and fails when the checked-in files differ. Run it with WSGW_UPDATE_GENERATED=1
//! to rewrite them.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let command = wsgw::cli::command();

    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .render(&mut page)
        .expect("render wsgw.1");
    files.push((PathBuf::from("man/wsgw.1"), page));
    for subcommand in command.get_subcommands() {
        let name = format!("wsgw-{}", subcommand.get_name());
        let display_name: &'static str = Box::leak(name.clone().into_boxed_str());
        let subcommand = subcommand
            .clone()
            .name(display_name)
            .after_long_help(wsgw::cli::reference_text());
        let mut page = Vec::new();
        clap_mangen::Man::new(subcommand)
            .render(&mut page)
            .expect("render a subcommand page");
        files.push((PathBuf::from(format!("man/{name}.1")), page));
    }

    for (shell, file) in [
        (Shell::Bash, "wsgw.bash"),
        (Shell::Zsh, "_wsgw"),
        (Shell::Fish, "wsgw.fish"),
        (Shell::Elvish, "wsgw.elv"),
        (Shell::PowerShell, "_wsgw.ps1"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command.clone(), "wsgw", &mut script);
        files.push((PathBuf::from(format!("completions/{file}")), script));
    }
    files
}

#[test]
fn man_pages_and_completions_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var("WSGW_UPDATE_GENERATED").as_deref() == Ok("1");
    let mut stale = Vec::new();
    for (path, content) in generated() {
        let full = root.join(&path);
        if update {
            std::fs::write(&full, &content).expect("write a generated file");
            continue;
        }
        if std::fs::read(&full).ok().as_deref() != Some(content.as_slice()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale generated files {stale:?}: run `WSGW_UPDATE_GENERATED=1 cargo test --test generated`"
    );
}

#[test]
fn man_page_lists_exit_codes_and_environment() {
    let page = generated()
        .into_iter()
        .find(|(path, _)| path == Path::new("man/wsgw.1"))
        .map(|(_, content)| String::from_utf8(content).expect("utf-8"))
        .expect("wsgw.1");
    for needle in [
        "Exit status",
        "75",
        "WSGW_AMQP_URL",
        "WSGW_TOKEN_SECRET",
        "replay\\-dlq",
    ] {
        assert!(page.contains(needle), "wsgw.1 lacks {needle:?}");
    }
}
