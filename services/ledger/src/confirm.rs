//! Confirmation before a command that sends, deletes or switches readers.

use std::io::{BufRead, IsTerminal, Write};

use ledger_runtime::{Config, Mode};

/// Goes on when `yes`; otherwise asks on the terminal. In production mode,
/// or without a terminal to ask on, it refuses: such commands there need
/// `--yes` written out.
pub fn confirm(config: &Config, yes: bool, what: &str) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if config.mode == Mode::Production {
        anyhow::bail!("{what}: refused in production mode without --yes");
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        anyhow::bail!("{what}: add --yes to do it (there is no terminal to ask on)");
    }
    eprint!("{what}. Go ahead? [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => anyhow::bail!("{what}: not confirmed; nothing done"),
    }
}
