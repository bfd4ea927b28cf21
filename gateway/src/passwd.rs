//! `fieldmq passwd FILE USER`: adds or changes a broker user, or removes
//! one with `--delete`.
//!
//! The password comes from a prompt with echo off (asked twice), or from
//! the first line of standard input when that is not a terminal, so a
//! provisioning script can pipe it in without it showing in `ps`. The file
//! is rewritten whole through a temporary file and a rename, so a gateway
//! reading it on SIGHUP never sees half of it; it keeps its owner and
//! group, and its mode is 0640 (the gateway's group reads it, nobody else).
//! A new file gets the caller's user and group: the package makes
//! /etc/fieldmq/passwd root:fieldmq at install, so the service can read it.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use mqtt_engine::access::passwords::{hash_password, set_user, PasswordFile, ITERATIONS};

#[derive(Args)]
pub struct PasswdArgs {
    /// The password file (created when missing).
    file: PathBuf,
    /// The user to add or change.
    user: String,
    /// Remove the user instead.
    #[arg(long, short = 'D')]
    delete: bool,
}

pub fn passwd(args: PasswdArgs) -> ExitCode {
    match run(&args) {
        Ok(message) => {
            eprintln!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &PasswdArgs) -> Result<String, String> {
    let user = args.user.as_str();
    // `#` would read back as a comment, outer spaces could never match an
    // ACL `user` line (which is trimmed), `:` ends the name in the file.
    let bad = user.is_empty()
        || user.contains(':')
        || user.starts_with('#')
        || user.trim() != user
        || user.chars().any(char::is_control);
    if bad {
        return Err(format!(
            "`{user}` cannot be a user name: it must be non-empty, not start with `#`, have no spaces at its ends, and no `:` or control characters"
        ));
    }
    let file = args.file.as_path();
    let existing = match std::fs::read_to_string(file) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    let text = existing.clone().unwrap_or_default();
    if let Err(errors) = PasswordFile::parse(&text) {
        let first = errors.first().map(|e| e.to_string()).unwrap_or_default();
        return Err(format!("{}: {first}; fix the file first", file.display()));
    }
    let (new_text, what) = if args.delete {
        let (new_text, existed) = set_user(&text, user, None);
        if !existed {
            return Err(format!("{}: no user `{user}`", file.display()));
        }
        (new_text, "removed")
    } else {
        let password = read_password()?;
        let hash = hash_password(password.as_bytes(), ITERATIONS)?;
        let (new_text, existed) = set_user(&text, user, Some(&hash));
        (new_text, if existed { "changed" } else { "added" })
    };
    write_atomically(file, new_text.as_bytes(), existing.is_some())?;
    Ok(format!("{}: user `{user}` {what}; `systemctl reload fieldmq` (SIGHUP) applies it", file.display()))
}

fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).map_err(|e| format!("reading the password from stdin: {e}"))?;
        let password = line.trim_end_matches(['\n', '\r']).to_owned();
        if password.is_empty() {
            return Err("an empty password on stdin".into());
        }
        return Ok(password);
    }
    let first = prompt("Password: ")?;
    if first.is_empty() {
        return Err("an empty password".into());
    }
    let second = prompt("Reenter password: ")?;
    if first != second {
        return Err("the passwords do not match".into());
    }
    Ok(first)
}

/// Asks on the terminal with echo off, restoring it afterwards.
fn prompt(question: &str) -> Result<String, String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).map_err(|e| format!("terminal: {e}"))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    tcsetattr(&stdin, OptionalActions::Now, &quiet).map_err(|e| format!("terminal: {e}"))?;
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, OptionalActions::Now, &saved);
    eprintln!();
    read.map_err(|e| format!("reading the password: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, and
/// renames it over `path`; keeps the old file's owner and group.
fn write_atomically(path: &Path, bytes: &[u8], existed: bool) -> Result<(), String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let fail = |e: std::io::Error, what: &Path| format!("{}: {e}", what.display());
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&temp)
            .map_err(|e| fail(e, &temp))?;
        file.write_all(bytes).map_err(|e| fail(e, &temp))?;
        // The umask may have taken bits off the mode asked for.
        file.set_permissions(std::fs::Permissions::from_mode(0o640)).map_err(|e| fail(e, &temp))?;
        if existed {
            if let Ok(old) = std::fs::metadata(path) {
                // Root editing a file owned root:fieldmq keeps it readable by
                // the gateway; a user who may not chown keeps their own ids.
                let _ = std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()));
            }
        }
        file.sync_all().map_err(|e| fail(e, &temp))?;
        std::fs::rename(&temp, path).map_err(|e| fail(e, path))?;
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
