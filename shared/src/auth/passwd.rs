//! Password files in Mosquitto's format, so a site's existing `mosquitto_passwd` file works unchanged and
//! `edge-agent passwd` writes files Mosquitto reads:
//!
//! ```text
//! # comment
//! robot5:$7$100000$<base64 salt>$<base64 hash>     PBKDF2-HMAC-SHA512, iterations, 12-byte salt, 64-byte hash
//! old:$6$<base64 salt>$<base64 hash>               SHA-512(password ‖ salt): read, never written
//! ```
//!
//! No plaintext is ever stored. Verification compares in constant time (ring's `pbkdf2::verify`, and
//! a comparison that does not stop at the first difference for the old format); an unknown user costs the same
//! derivation as a known one, so timing does not say which users exist.

use std::collections::HashMap;
use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::{digest, pbkdf2};

/// Iterations `edge-agent passwd` uses: about 60 ms of one core here per check, which makes guessing
/// slow while a client's CONNECT stays quick (Mosquitto's own default is 101).
pub const DEFAULT_ITERATIONS: u32 = 100_000;

/// Bytes of salt `hash_password` expects (Mosquitto's).
pub const SALT_LEN: usize = 12;

const HASH_LEN: usize = 64;

/// One user's stored hash.
#[derive(Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pbkdf2 { iterations, .. } => write!(f, "Pbkdf2 {{ iterations: {iterations} }}"),
            Self::Sha512 { .. } => f.write_str("Sha512"),
        }
    }
}

/// A line of a password file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct PasswdError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub what: String,
}

/// The users of a password file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passwords {
    users: HashMap<String, Hash>,
}

/// A fixed hash that an unknown user's password is checked against, so the check costs the same.
static DUMMY_SALT: [u8; SALT_LEN] = [0x5a; SALT_LEN];

impl Passwords {
    /// Parses a whole file; every bad line is reported.
    ///
    /// # Errors
    /// One [`PasswdError`] per unusable line (bad format, unknown hash type, duplicate user).
    pub fn parse(text: &str) -> Result<Self, Vec<PasswdError>> {
        let mut users = HashMap::new();
        let mut errors = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |what: &str| PasswdError {
                line: i + 1,
                what: what.to_owned(),
            };
            let Some((user, stored)) = line.split_once(':') else {
                errors.push(error("expected user:hash"));
                continue;
            };
            if user.is_empty() {
                errors.push(error("empty user name"));
                continue;
            }
            match parse_hash(stored) {
                Ok(hash) => {
                    if users.insert(user.to_owned(), hash).is_some() {
                        errors.push(error(&format!("user {user:?} appears twice")));
                    }
                }
                Err(what) => errors.push(error(&format!("user {user:?}: {what}"))),
            }
        }
        if errors.is_empty() {
            Ok(Self { users })
        } else {
            Err(errors)
        }
    }

    /// How many users the file holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file holds no user.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` exists and `password` is theirs. Slow on purpose (see [`DEFAULT_ITERATIONS`]): call it
    /// off the async runtime.
    #[must_use]
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => check(hash, password),
            None => {
                // Same cost as a real check, so a client cannot time which users exist.
                let mut out = [0u8; HASH_LEN];
                pbkdf2::derive(
                    pbkdf2::PBKDF2_HMAC_SHA512,
                    NonZeroU32::new(DEFAULT_ITERATIONS).unwrap_or(NonZeroU32::MIN),
                    &DUMMY_SALT,
                    password,
                    &mut out,
                );
                false
            }
        }
    }
}

fn check(hash: &Hash, password: &[u8]) -> bool {
    match hash {
        Hash::Pbkdf2 {
            iterations,
            salt,
            hash,
        } => pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA512,
            *iterations,
            salt,
            password,
            hash,
        )
        .is_ok(),
        Hash::Sha512 { salt, hash } => {
            let mut ctx = digest::Context::new(&digest::SHA512);
            ctx.update(password);
            ctx.update(salt);
            let got = ctx.finish();
            constant_time_eq(got.as_ref(), hash)
        }
    }
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn parse_hash(stored: &str) -> Result<Hash, String> {
    let parts: Vec<&str> = stored.split('$').collect();
    let decode = |what: &str, s: &str| {
        STANDARD
            .decode(s)
            .map_err(|e| format!("{what} is not base64: {e}"))
    };
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => {
            let iterations = iterations
                .parse::<u32>()
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or_else(|| format!("invalid iteration count {iterations:?}"))?;
            let hash = decode("hash", hash)?;
            if hash.len() != HASH_LEN {
                return Err(format!("hash is {} bytes, not {HASH_LEN}", hash.len()));
            }
            Ok(Hash::Pbkdf2 {
                iterations,
                salt: decode("salt", salt)?,
                hash,
            })
        }
        ["", "6", salt, hash] => {
            let hash = decode("hash", hash)?;
            if hash.len() != HASH_LEN {
                return Err(format!("hash is {} bytes, not {HASH_LEN}", hash.len()));
            }
            Ok(Hash::Sha512 {
                salt: decode("salt", salt)?,
                hash,
            })
        }
        _ if !stored.starts_with('$') => {
            Err("not a hash (plaintext passwords are not accepted: hash the file with `edge-agent passwd` or `mosquitto_passwd -U`)".to_owned())
        }
        _ => Err("unknown hash type (expected $7$ PBKDF2-SHA512 or $6$ SHA-512)".to_owned()),
    }
}

/// The stored form of `password` (`$7$` PBKDF2-HMAC-SHA512), as `mosquitto_passwd` writes it.
#[must_use]
pub fn hash_password(password: &[u8], salt: &[u8; SALT_LEN], iterations: NonZeroU32) -> String {
    let mut out = [0u8; HASH_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA512,
        iterations,
        salt,
        password,
        &mut out,
    );
    format!(
        "$7${iterations}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

/// A user name a password file can hold: not empty, no `:` (the separator), no control characters.
///
/// # Errors
/// Says what is wrong.
pub fn check_user(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("empty user name".to_owned());
    }
    if user.contains(':') || user.chars().any(char::is_control) {
        return Err(format!(
            "user name {user:?} contains ':' or a control character"
        ));
    }
    Ok(())
}

/// `text` (a password file) with `user`'s line set to `stored`: replaced where it was, appended otherwise.
/// Comments and other users' lines are kept as they were.
#[must_use]
pub fn set_user(text: &str, user: &str, stored: &str) -> String {
    let mut out = String::with_capacity(text.len() + user.len() + stored.len() + 2);
    let mut found = false;
    for line in text.lines() {
        if line.trim().split_once(':').is_some_and(|(u, _)| u == user) {
            if !found {
                out.push_str(&format!("{user}:{stored}\n"));
                found = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if !found {
        out.push_str(&format!("{user}:{stored}\n"));
    }
    out
}

/// `text` without `user`'s line; `None` if there was none.
#[must_use]
pub fn remove_user(text: &str, user: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut found = false;
    for line in text.lines() {
        if line.trim().split_once(':').is_some_and(|(u, _)| u == user) {
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    found.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Written by `mosquitto_passwd -b` 2.0.11 (the first with its default 101 iterations, the second
    /// with `-H sha512`): our check must accept what Mosquitto wrote.
    const MOSQUITTO: &str = "robot5:$7$101$QzIxsOCAVtNQ/dA8$YV4pLgmVaTFoHjIm00gWeWQhoptQqdHv0A3B9ifi5rJwdHa4YoypWiHI4LDrEYZMDmhyii0z5zyJsFo7T1IRmw==
old:$6$0+ivWnVCID0A3MgK$4qsjnR0GXEezrbaxNWhKltb5ZTTFM31I63l4Rx7Dzb7RAHBx9eHinkk+X4AU95LC9v1IR/tavKCD/wAXTDPPpw==
";

    #[test]
    fn mosquitto_passwd_files_verify() {
        let p = Passwords::parse(MOSQUITTO).expect("valid");
        assert_eq!(p.len(), 2);
        assert!(p.verify("robot5", b"robot5-secret"));
        assert!(!p.verify("robot5", b"robot5-secreT"));
        assert!(p.verify("old", b"oldpw"));
        assert!(!p.verify("old", b"oldpw "));
        assert!(!p.verify("nobody", b"robot5-secret"));
    }

    #[test]
    fn what_we_write_verifies_and_is_mosquittos_format() {
        let stored = hash_password(
            b"pw",
            &[7; SALT_LEN],
            NonZeroU32::new(1000).expect("nonzero"),
        );
        assert!(stored.starts_with("$7$1000$"), "{stored}");
        let text = set_user("# users\nold:$6$0+ivWnVCID0A3MgK$4qsjnR0GXEezrbaxNWhKltb5ZTTFM31I63l4Rx7Dzb7RAHBx9eHinkk+X4AU95LC9v1IR/tavKCD/wAXTDPPpw==\n", "new", &stored);
        let p = Passwords::parse(&text).expect("valid");
        assert!(p.verify("new", b"pw"));
        assert!(p.verify("old", b"oldpw"));
        assert!(text.starts_with("# users\n"), "comments kept");
        // Replacing keeps one line per user.
        let again = set_user(
            &text,
            "new",
            &hash_password(b"pw2", &[8; SALT_LEN], NonZeroU32::MIN),
        );
        let p = Passwords::parse(&again).expect("valid");
        assert_eq!(p.len(), 2);
        assert!(p.verify("new", b"pw2") && !p.verify("new", b"pw"));
        let removed = remove_user(&again, "new").expect("was there");
        assert_eq!(Passwords::parse(&removed).expect("valid").len(), 1);
        assert_eq!(remove_user(&removed, "new"), None);
    }

    #[test]
    fn bad_files_say_every_bad_line() {
        let errors =
            Passwords::parse("a:plain\n# ok\nb\nc:$9$x$y\nd:$7$0$AA==$AA==\n").expect_err("bad");
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![1, 3, 4, 5], "{errors:?}");
        assert!(errors[0].what.contains("plaintext"), "{errors:?}");
    }

    #[test]
    fn user_names() {
        assert!(check_user("robot5").is_ok());
        assert!(check_user("").is_err());
        assert!(check_user("a:b").is_err());
        assert!(check_user("a\nb").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn any_password_round_trips(user in "[a-z0-9_.-]{1,12}", pw in proptest::collection::vec(any::<u8>(), 0..40), salt in any::<[u8; SALT_LEN]>()) {
            let stored = hash_password(&pw, &salt, NonZeroU32::new(10).expect("nonzero"));
            let p = Passwords::parse(&set_user("", &user, &stored)).expect("valid");
            prop_assert!(p.verify(&user, &pw));
            // Not a 0 byte: HMAC pads its key with zeros, so PBKDF2 cannot tell `pw` from `pw` + NUL (the
            // same holds for Mosquitto's files).
            let mut other = pw.clone();
            other.push(b'x');
            prop_assert!(!p.verify(&user, &other));
        }

        #[test]
        fn parse_is_total(text in "\\PC{0,200}") {
            let _ = Passwords::parse(&text);
        }
    }
}
