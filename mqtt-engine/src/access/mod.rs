//! Who may connect to the local broker, and what each client may read
//! and write.
//!
//! The broker sits on a plant LAN where anyone plugged in reaches it, and
//! some topics write to field devices, so access is checked at three
//! places: at CONNECT (passwords, client certificates, anonymous clients),
//! at each SUBSCRIBE and PUBLISH, and at each delivery (an ACL may allow a
//! subscription's filter while denying part of what it matches, and a
//! reload may change the rules under a live subscription).
//!
//! - `passwords.rs`: the password file, mosquitto_passwd's format.
//! - `acl.rs`: the ACL file, mosquitto's syntax.
//! - `guard.rs`: failed logins slow down the address they come from.
//!
//! [`Access`] is immutable: a reload (SIGHUP) builds a new one and the
//! broker swaps it in, so connected clients keep their session and meet
//! the new rules at their next packet.

pub mod acl;
mod guard;
pub mod passwords;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ring::hmac;
use ring::rand::SystemRandom;

pub use acl::Acl;
pub(crate) use guard::LoginGuard;
pub use passwords::PasswordFile;

/// The files access comes from, as the config names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessFiles {
    /// Whether clients without credentials may connect.
    pub allow_anonymous: bool,
    /// `user:hash` lines.
    pub password_file: Option<PathBuf>,
    /// mosquitto-syntax ACL.
    pub acl_file: Option<PathBuf>,
}

/// Who may connect and what they may do; swapped whole on reload.
pub struct Access {
    allow_anonymous: bool,
    passwords: Option<PasswordFile>,
    acl: Option<Acl>,
    /// Passwords verified since the files were read, as keyed MACs: a
    /// client reconnecting (or a hundred sharing one user) pays PBKDF2 once.
    verified: Mutex<HashMap<String, hmac::Tag>>,
    key: hmac::Key,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("allow_anonymous", &self.allow_anonymous)
            .field("users", &self.passwords.as_ref().map(PasswordFile::len))
            .field("acl_rules", &self.acl.as_ref().map(Acl::rule_count))
            .finish()
    }
}

impl Default for Access {
    /// Anyone may connect and do anything: the broker without a config.
    fn default() -> Self {
        Access::new(true, None, None)
    }
}

/// Why a login was refused; the client hears only "bad user name or
/// password" or "not authorized", never which part was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A user name and password that do not match the file (or no file).
    BadCredentials,
    /// No credentials, and anonymous clients are not allowed.
    AnonymousNotAllowed,
    /// The password could not be checked before the connect deadline
    /// (logins queued for the hashing slots).
    Busy,
}

impl Access {
    /// Access from what was read.
    pub fn new(allow_anonymous: bool, passwords: Option<PasswordFile>, acl: Option<Acl>) -> Access {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new()).unwrap_or_else(|_| {
            hmac::Key::new(hmac::HMAC_SHA256, &crate::random::random_u64().to_le_bytes())
        });
        Access { allow_anonymous, passwords, acl, verified: Mutex::new(HashMap::new()), key }
    }

    /// Reads the files; each problem comes back as `path:line:col: what`.
    pub fn load(files: &AccessFiles) -> Result<Access, Vec<String>> {
        let mut errors = Vec::new();
        let passwords = match &files.password_file {
            Some(path) => PasswordFile::load(path).map_err(|e| errors.extend(e)).ok(),
            None => None,
        };
        let acl = match &files.acl_file {
            Some(path) => Acl::load(path).map_err(|e| errors.extend(e)).ok(),
            None => None,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Access::new(files.allow_anonymous, passwords, acl))
    }

    /// The ACL, when there is one; without one every client may do anything.
    pub fn acl(&self) -> Option<&Acl> {
        self.acl.as_ref()
    }

    /// The password file, when there is one.
    pub fn passwords(&self) -> Option<&PasswordFile> {
        self.passwords.as_ref()
    }

    /// Whether clients without credentials may connect.
    pub fn allow_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Whether `user` may publish to `topic` (`$SYS` is the broker's own).
    pub fn may_write(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        if crate::topic::is_sys(topic) {
            return false;
        }
        self.acl.as_ref().is_none_or(|acl| acl.may_write(user, client_id, topic))
    }

    /// Whether `user` may receive a message on `topic`.
    pub fn may_read(&self, user: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.acl.as_ref().is_none_or(|acl| acl.may_read(user, client_id, topic))
    }

    /// Whether `user` may subscribe to `filter`.
    pub fn may_subscribe(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        self.acl.as_ref().is_none_or(|acl| acl.may_subscribe(user, client_id, filter))
    }

    /// Whether a verification of this user and password succeeded before.
    fn verified_before(&self, user: &str, password: &[u8]) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified.get(user).is_some_and(|tag| hmac::verify(&self.key, password, tag.as_ref()).is_ok())
    }

    fn remember(&self, user: &str, password: &[u8]) {
        let tag = hmac::sign(&self.key, password);
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the number of users in the file.
        verified.insert(user.to_owned(), tag);
    }
}

/// Decides a login: `Ok` with the user name the client acts as (`None`:
/// anonymous). `certificate_user` is the CN of a client certificate the
/// TLS layer verified; it logs the client in without a password.
///
/// Waiting (the penalty, a hashing slot) stops at `deadline`; a hash once
/// started runs to its end and is counted, so cancelling logins cannot
/// run more hashes at once than there are slots.
pub(crate) async fn login(
    access: Arc<Access>,
    guard: &LoginGuard,
    deadline: tokio::time::Instant,
    ip: Option<std::net::IpAddr>,
    certificate_user: Option<Arc<str>>,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Result<Option<Arc<str>>, Refusal> {
    if let Some(user) = certificate_user {
        return Ok(Some(user));
    }
    let Some(user) = username else {
        return if access.allow_anonymous { Ok(None) } else { Err(Refusal::AnonymousNotAllowed) };
    };
    let Some(passwords) = &access.passwords else {
        // Nothing to check a name against: the client is anonymous, and
        // only where anonymous clients are welcome.
        return if access.allow_anonymous { Ok(None) } else { Err(Refusal::BadCredentials) };
    };
    let password = password.unwrap_or_default();
    if access.verified_before(user, password) {
        return Ok(Some(Arc::from(user)));
    }
    let Some(_pending) = guard.begin(ip) else {
        // Penalised, with a check from there already running: no hashing.
        return Err(Refusal::BadCredentials);
    };
    let verified = if passwords.is_empty() {
        guard.wait_turn(ip).await;
        false
    } else {
        let slot = tokio::time::timeout_at(deadline, async {
            guard.wait_turn(ip).await;
            guard.hashing().await
        });
        let Ok(_hashing) = slot.await else { return Err(Refusal::Busy) };
        let (access, user_owned, password_owned) = (access.clone(), user.to_owned(), password.to_vec());
        tokio::task::spawn_blocking(move || {
            access.passwords.as_ref().is_some_and(|p| p.verify(&user_owned, &password_owned))
        })
        .await
        .unwrap_or(false)
    };
    if verified {
        access.remember(user, password);
        guard.succeeded(ip);
        Ok(Some(Arc::from(user)))
    } else {
        guard.failed(ip);
        Err(Refusal::BadCredentials)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(allow_anonymous: bool) -> Arc<Access> {
        let hash = passwords::hash_password(b"pw", 1000).unwrap();
        let passwords = PasswordFile::parse(&format!("alice:{hash}\n")).unwrap();
        let acl = Acl::parse("topic read fieldmq/#\nuser alice\ntopic readwrite fieldmq/#\n").unwrap();
        Arc::new(Access::new(allow_anonymous, Some(passwords), Some(acl)))
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(10)
    }

    #[tokio::test]
    async fn logins_are_decided_by_password_certificate_or_anonymity() {
        let guard = LoginGuard::default();
        let ip = Some("192.0.2.1".parse().unwrap());
        let a = access(false);
        let ok = login(a.clone(), &guard, soon(), ip, None, Some("alice"), Some(b"pw")).await;
        assert_eq!(ok.unwrap().as_deref(), Some("alice"));
        // Remembered: the second time needs no PBKDF2, and still checks.
        assert!(a.verified_before("alice", b"pw"));
        assert!(!a.verified_before("alice", b"pW"));
        let wrong = login(a.clone(), &guard, soon(), ip, None, Some("alice"), Some(b"pW")).await;
        assert_eq!(wrong, Err(Refusal::BadCredentials));
        let unknown = login(a.clone(), &guard, soon(), ip, None, Some("mallory"), Some(b"pw")).await;
        assert_eq!(unknown, Err(Refusal::BadCredentials));
        let anonymous = login(a.clone(), &guard, soon(), ip, None, None, None).await;
        assert_eq!(anonymous, Err(Refusal::AnonymousNotAllowed));
        let certificate = login(a.clone(), &guard, soon(), ip, Some("sensor-7".into()), None, None).await;
        assert_eq!(certificate.unwrap().as_deref(), Some("sensor-7"));
        let open = access(true);
        assert_eq!(login(open, &guard, soon(), ip, None, None, None).await, Ok(None));
    }

    #[test]
    fn no_client_writes_sys_topics_even_without_an_acl() {
        let open = Access::default();
        assert!(!open.may_write(None, "c", "$SYS/broker/uptime"));
        assert!(open.may_write(None, "c", "anything/at/all"));
        assert!(open.may_read(None, "c", "$SYS/broker/uptime"));
        let a = access(true);
        assert!(!a.may_write(None, "c", "fieldmq/gw/plc/set/speed"));
        assert!(a.may_write(Some("alice"), "c", "fieldmq/gw/plc/set/speed"));
        assert!(a.may_subscribe(None, "c", "fieldmq/#"));
        assert!(!a.may_subscribe(None, "c", "#"));
    }
}
