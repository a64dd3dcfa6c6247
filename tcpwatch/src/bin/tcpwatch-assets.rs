//! `tcpwatch-assets DIR`: shell completions (bash, zsh, fish) and a man page for tcpwatch and
//! each subcommand, generated from the clap definitions, for `cargo xtask dist`. Not shipped.
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: tcpwatch-assets DIR");
        std::process::exit(2);
    };
    if let Err(e) = generate(&dir) {
        eprintln!("tcpwatch-assets: {e}");
        std::process::exit(1);
    }
}

fn generate(dir: &Path) -> std::io::Result<()> {
    let mut cmd = tcpwatch::cli::Cli::command();
    cmd.build();
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "tcpwatch", &completions)?;
    }
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    page(&cmd, "tcpwatch", &man)?;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        // clap takes static names (its `string` feature is off); this tool runs once.
        let name: &'static str = Box::leak(format!("tcpwatch-{}", sub.get_name()).into_boxed_str());
        let bin: &'static str = Box::leak(name.replacen('-', " ", 1).into_boxed_str());
        let sub = sub.clone().name(name).bin_name(bin);
        page(&sub, name, &man)?;
    }
    Ok(())
}

fn page(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_uppercase())
        .section("1")
        .manual("tcpwatch manual")
        .source(format!("tcpwatch {}", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)?;
    std::fs::write(dir.join(format!("{name}.1")), buf)
}
