//! The broker's password file: `user:hash` lines, as mosquitto_passwd
//! writes them, so a site can bring its mosquitto file along.
//!
//! New hashes are PBKDF2-HMAC-SHA512 (`$7$iterations$salt$hash`, base64,
//! mosquitto 2's format) from ring, which the binary carries for TLS
//! anyway: no second crypto library. Mosquitto writes 101 iterations; we
//! write [`ITERATIONS`], and read any count. mosquitto 1.x's `$6$` (one
//! salted SHA-512) is still accepted, with a warning at load, so an old
//! file keeps working until its users are re-set.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, pbkdf2};

/// PBKDF2 rounds for a new hash. About 40 ms on one x86-64 core here and
/// a few hundred on a Pi: paid at login only, and the broker remembers a
/// verified password until the file is reloaded.
pub const ITERATIONS: u32 = 100_000;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

/// A hash from the file, ready to check a password against.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// mosquitto 1.x: SHA-512 of password then salt.
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// A problem in the password file, at a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordFileError {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for PasswordFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

/// The users of a password file.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: BTreeMap<String, Hash>,
    /// Users whose hash is weak: mosquitto 1.x's, or few rounds.
    weak: Vec<String>,
    /// The most rounds of any hash: an unknown user is hashed with as many,
    /// so that a refusal takes as long whichever part was wrong.
    dummy_rounds: u32,
}

/// Fewer PBKDF2 rounds than this is weak (mosquitto_passwd 2.0 writes 101).
pub const WEAK_ROUNDS: u32 = 10_000;
/// The most rounds an unknown user is hashed with.
const MAX_DUMMY_ROUNDS: u32 = 1_000_000;

impl PasswordFile {
    /// Parses the text of a password file; every bad line is reported.
    pub fn parse(text: &str) -> Result<PasswordFile, Vec<PasswordFileError>> {
        let mut file = PasswordFile::default();
        let mut errors = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let error = |column: usize, message: &str| PasswordFileError {
                line: index + 1,
                column,
                message: message.to_owned(),
            };
            let Some((user, hash)) = line.split_once(':') else {
                errors.push(error(1, "expected user:hash"));
                continue;
            };
            if user.is_empty() {
                errors.push(error(1, "empty user name"));
                continue;
            }
            match parse_hash(hash) {
                Ok(parsed) => {
                    let weak = match &parsed {
                        Hash::Sha512 { .. } => true,
                        Hash::Pbkdf2 { iterations, .. } => {
                            file.dummy_rounds = file.dummy_rounds.max(iterations.get());
                            iterations.get() < WEAK_ROUNDS
                        }
                    };
                    if weak {
                        file.weak.push(user.to_owned());
                    }
                    if file.users.insert(user.to_owned(), parsed).is_some() {
                        errors.push(error(1, &format!("user `{user}` appears twice")));
                    }
                }
                Err(why) => errors.push(error(user.len() + 2, why)),
            }
        }
        if errors.is_empty() {
            Ok(file)
        } else {
            Err(errors)
        }
    }

    /// Reads and parses a password file; errors carry the path.
    pub fn load(path: &Path) -> Result<PasswordFile, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        PasswordFile::parse(&text).map_err(|errors| {
            errors
                .iter()
                .map(|e| format!("{}:{}:{}: {}", path.display(), e.line, e.column, e.message))
                .collect()
        })
    }

    /// The users of this file that `new` drops or gives another hash: a
    /// reload disconnects them.
    pub fn revoked_by(&self, new: Option<&PasswordFile>) -> Vec<String> {
        self.users
            .iter()
            .filter(|(user, hash)| new.and_then(|n| n.users.get(*user)) != Some(*hash))
            .map(|(user, _)| user.clone())
            .collect()
    }

    /// Users whose hash is weak: mosquitto 1.x's single salted SHA-512, or
    /// fewer than [`WEAK_ROUNDS`] PBKDF2 rounds.
    pub fn weak_users(&self) -> &[String] {
        &self.weak
    }

    /// How many users the file has.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `password` is `user`'s. Slow on purpose (PBKDF2): call it
    /// off the async threads. An unknown user costs the same time as a
    /// known one, so timing does not tell which part was wrong.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(Hash::Pbkdf2 { iterations, salt, hash }) => {
                pbkdf2::verify(pbkdf2::PBKDF2_HMAC_SHA512, *iterations, salt, password, hash).is_ok()
            }
            Some(Hash::Sha512 { salt, hash }) => {
                let mut context = digest::Context::new(&digest::SHA512);
                context.update(password);
                context.update(salt);
                let computed = context.finish();
                constant_time_eq(computed.as_ref(), hash)
            }
            None => {
                let mut sink = [0u8; HASH_LEN];
                // Capped, so one absurd count in the file cannot make every
                // unknown user's login cost minutes.
                let dummy = self.dummy_rounds.clamp(1, MAX_DUMMY_ROUNDS);
                if let Some(rounds) = NonZeroU32::new(dummy) {
                    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, rounds, &[0; SALT_LEN], password, &mut sink);
                }
                false
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_hash(text: &str) -> Result<Hash, &'static str> {
    let decode = |part: &str| STANDARD.decode(part).map_err(|_| "the salt or hash is not valid base64");
    let parts: Vec<&str> = text.split('$').collect();
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => {
            let iterations = iterations
                .parse::<u32>()
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or("the iteration count of a $7$ hash must be a number above 0")?;
            let (salt, hash) = (decode(salt)?, decode(hash)?);
            if hash.len() != HASH_LEN {
                return Err("a $7$ hash must be 64 bytes");
            }
            Ok(Hash::Pbkdf2 { iterations, salt, hash })
        }
        ["", "6", salt, hash] => {
            let (salt, hash) = (decode(salt)?, decode(hash)?);
            if hash.len() != HASH_LEN {
                return Err("a $6$ hash must be 64 bytes");
            }
            Ok(Hash::Sha512 { salt, hash })
        }
        _ => Err("unknown hash format: expected $7$iterations$salt$hash (fieldmq passwd, mosquitto_passwd 2.x) or $6$salt$hash"),
    }
}

/// A new `$7$` hash of `password` with a fresh random salt.
pub fn hash_password(password: &[u8], iterations: u32) -> Result<String, String> {
    let rounds = NonZeroU32::new(iterations).ok_or("iterations must be above 0")?;
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new().fill(&mut salt).map_err(|_| "the system's random source failed")?;
    let mut hash = [0u8; HASH_LEN];
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA512, rounds, &salt, password, &mut hash);
    Ok(format!("$7${iterations}${}${}", STANDARD.encode(salt), STANDARD.encode(hash)))
}

/// The text of a password file with `user`'s line set to `hash`, or
/// removed when `hash` is `None`; other lines, comments included, stay as
/// they were. Says whether the user was there before.
pub fn set_user(text: &str, user: &str, hash: Option<&str>) -> (String, bool) {
    let mut out = String::with_capacity(text.len() + 128);
    let mut found = false;
    for line in text.lines() {
        let is_user = line.split_once(':').is_some_and(|(u, _)| u == user) && !line.starts_with('#');
        if is_user {
            if let (Some(hash), false) = (hash, found) {
                out.push_str(&format!("{user}:{hash}\n"));
            }
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let (Some(hash), false) = (hash, found) {
        out.push_str(&format!("{user}:{hash}\n"));
    }
    (out, found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_we_write_verifies_and_a_wrong_password_does_not() {
        let hash = hash_password(b"s3cret", 1000).unwrap();
        let file = PasswordFile::parse(&format!("# users\nalice:{hash}\n")).unwrap();
        assert!(file.verify("alice", b"s3cret"));
        assert!(!file.verify("alice", b"s3cret "));
        assert!(!file.verify("bob", b"s3cret"));
        assert_eq!(file.len(), 1);
    }

    #[test]
    fn salts_differ_between_two_hashes_of_one_password() {
        assert_ne!(hash_password(b"x", 10).unwrap(), hash_password(b"x", 10).unwrap());
    }

    #[test]
    fn mosquitto_1x_sha512_hashes_are_read_and_flagged_weak() {
        let salt = [7u8; 12];
        let mut context = digest::Context::new(&digest::SHA512);
        context.update(b"pw");
        context.update(&salt);
        let line = format!("old:$6${}${}", STANDARD.encode(salt), STANDARD.encode(context.finish()));
        let file = PasswordFile::parse(&line).unwrap();
        assert!(file.verify("old", b"pw"));
        assert!(!file.verify("old", b"pW"));
        assert_eq!(file.weak_users(), ["old".to_owned()]);
    }

    #[test]
    fn bad_lines_are_reported_with_their_line_and_column() {
        let errors = PasswordFile::parse("a:$7$1$AAAA$AAAA\n\nnocolon\nb:plain\n:x\n").unwrap_err();
        let got: Vec<(usize, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(got, vec![(1, 3), (3, 1), (4, 3), (5, 1)]);
        assert!(errors[0].message.contains("64 bytes"), "{}", errors[0]);
    }

    #[test]
    fn setting_a_user_keeps_the_other_lines_and_deleting_removes_it() {
        let text = "# site users\nalice:A\nbob:B\n";
        let (changed, existed) = set_user(text, "alice", Some("N"));
        assert!(existed);
        assert_eq!(changed, "# site users\nalice:N\nbob:B\n");
        let (added, existed) = set_user(text, "carol", Some("C"));
        assert!(!existed);
        assert_eq!(added, "# site users\nalice:A\nbob:B\ncarol:C\n");
        let (deleted, existed) = set_user(text, "bob", None);
        assert!(existed);
        assert_eq!(deleted, "# site users\nalice:A\n");
    }
}
