//! QUIC and TLS keys shared by every data-plane node of a deployment.
//!
//! Behind a UDP load balancer a client's packets can land on any node, and a
//! replacement pod never saw its predecessor's connections. Three keys, the
//! same on every node (a Kubernetes Secret mounted at `server.shared_keys_dir`),
//! make that survivable (PITFALLS §1, §2):
//!
//! - `stateless-reset-key`: keys the stateless-reset tokens *and* the
//!   connection-ID generator, so a node can recognise another node's CIDs and
//!   answer a dead connection with a reset at once instead of letting the
//!   client wait out its idle timeout.
//! - `token-key`: address-validation (Retry / NEW_TOKEN) tokens any node accepts.
//! - `ticket-keys`: TLS 1.3 session tickets any node can decrypt, so a client
//!   that reconnects elsewhere resumes instead of doing a full handshake.
//!
//! Each file holds at least 32 raw bytes (`head -c 32 /dev/urandom`).
//! `ticket-keys` may hold several 32-byte keys back to back: the first
//! encrypts, all decrypt, so a rotation is "prepend a new key, roll, then drop
//! the old one". Ticket keys are further rolled every [`TICKET_PERIOD`] by
//! derivation, and tickets of the current and previous period are accepted.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::{aead, hkdf, hmac, rand::SecureRandom};

/// File names inside `server.shared_keys_dir` (the chart's Secret keys).
pub const RESET_KEY_FILE: &str = "stateless-reset-key";
pub const TOKEN_KEY_FILE: &str = "token-key";
pub const TICKET_KEYS_FILE: &str = "ticket-keys";

/// Smallest accepted key, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// Ticket keys roll (by derivation) every period; a ticket lives at most two.
pub const TICKET_PERIOD: Duration = Duration::from_secs(6 * 3600);

/// The three keys, read once at start-up.
pub struct SharedKeys {
    reset: Vec<u8>,
    token: Vec<u8>,
    tickets: Vec<[u8; 32]>,
}

impl fmt::Debug for SharedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedKeys")
            .field("ticket_keys", &self.tickets.len())
            .finish_non_exhaustive()
    }
}

impl SharedKeys {
    /// Reads the three files from `dir`; every problem names the file.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |name: &str| -> Result<Vec<u8>, String> {
            let path = dir.join(name);
            let bytes =
                std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if bytes.len() < MIN_KEY_LEN {
                return Err(format!(
                    "{} holds {} bytes, needs at least {MIN_KEY_LEN} random bytes",
                    path.display(),
                    bytes.len()
                ));
            }
            Ok(bytes)
        };
        let reset = read(RESET_KEY_FILE)?;
        let token = read(TOKEN_KEY_FILE)?;
        let ticket_bytes = read(TICKET_KEYS_FILE)?;
        Self::from_parts(reset, token, &ticket_bytes)
    }

    fn from_parts(reset: Vec<u8>, token: Vec<u8>, ticket_bytes: &[u8]) -> Result<Self, String> {
        if !ticket_bytes.len().is_multiple_of(32) {
            return Err(format!(
                "{TICKET_KEYS_FILE} holds {} bytes, not a multiple of 32 (one or more 32-byte keys)",
                ticket_bytes.len()
            ));
        }
        let tickets = ticket_bytes
            .chunks_exact(32)
            .map(|c| c.try_into().expect("chunks of 32"))
            .collect();
        Ok(Self {
            reset,
            token,
            tickets,
        })
    }

    /// The stateless-reset HMAC key.
    pub fn reset_key(&self) -> Arc<hmac::Key> {
        Arc::new(hmac::Key::new(hmac::HMAC_SHA256, &self.reset))
    }

    /// Key of the connection-ID generator (derived from the reset key, so that
    /// one secret decides both which CIDs are ours and which resets are valid).
    pub fn cid_key(&self) -> u64 {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.reset);
        let tag = hmac::sign(&key, b"gatesvr quic cid generator");
        u64::from_le_bytes(tag.as_ref()[..8].try_into().expect("8 bytes"))
    }

    /// The address-validation token key.
    pub fn token_key(&self) -> Arc<hkdf::Prk> {
        Arc::new(hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &self.token))
    }

    /// The shared TLS session-ticket encrypter.
    pub fn ticketer(&self) -> Arc<SharedTicketer> {
        Arc::new(SharedTicketer::new(&self.tickets, || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        }))
    }
}

/// Stateless TLS 1.3 session tickets under keys shared by every node.
///
/// A ticket is `period (8 bytes, big endian) || nonce (12) || AES-256-GCM(state)`,
/// the period authenticated as associated data. The key of a period is
/// HKDF(master, "gatesvr ticket" || period), so every node derives the same
/// keys without coordination, and a period's key is erased (never derived
/// again for decryption) once two periods have passed.
pub struct SharedTicketer {
    masters: Vec<hkdf::Prk>,
    now: Box<dyn Fn() -> u64 + Send + Sync>,
    rng: ring::rand::SystemRandom,
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("keys", &self.masters.len())
            .finish_non_exhaustive()
    }
}

const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 8 + NONCE_LEN;

impl SharedTicketer {
    fn new(keys: &[[u8; 32]], now: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self {
            masters: keys
                .iter()
                .map(|k| hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, k))
                .collect(),
            now: Box::new(now),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    fn period(&self) -> u64 {
        (self.now)() / TICKET_PERIOD.as_secs()
    }

    fn key(master: &hkdf::Prk, period: u64) -> aead::LessSafeKey {
        let period = period.to_be_bytes();
        let info = [b"gatesvr ticket".as_slice(), period.as_slice()];
        let okm = master
            .expand(&info, &aead::AES_256_GCM)
            .expect("HKDF output of one AES key");
        aead::LessSafeKey::new(aead::UnboundKey::from(okm))
    }
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        !self.masters.is_empty()
    }

    fn lifetime(&self) -> u32 {
        TICKET_PERIOD.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let period = self.period();
        let key = Self::key(self.masters.first()?, period);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + aead::MAX_TAG_LEN);
        out.extend_from_slice(&period.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(period.to_be_bytes()),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < HEADER_LEN + aead::MAX_TAG_LEN {
            return None;
        }
        let period = u64::from_be_bytes(cipher[..8].try_into().ok()?);
        let now = self.period();
        if period > now || now - period > 1 {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = cipher[8..HEADER_LEN].try_into().ok()?;
        for master in &self.masters {
            let mut body = cipher[HEADER_LEN..].to_vec();
            let opened = Self::key(master, period).open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(period.to_be_bytes()),
                &mut body,
            );
            if let Ok(plain) = opened {
                let len = plain.len();
                body.truncate(len);
                return Some(body);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use rustls::server::ProducesTickets;

    use super::*;

    fn clock(start: u64) -> (Arc<AtomicU64>, impl Fn() -> u64 + Send + Sync + 'static) {
        let t = Arc::new(AtomicU64::new(start));
        let c = t.clone();
        (t, move || c.load(Ordering::Relaxed))
    }

    const P: u64 = TICKET_PERIOD.as_secs();

    #[test]
    fn another_node_with_the_same_keys_decrypts() {
        let (_, now) = clock(100 * P);
        let a = SharedTicketer::new(&[[7; 32]], now);
        let (_, now) = clock(100 * P + 5);
        let b = SharedTicketer::new(&[[7; 32]], now);
        let ticket = a.encrypt(b"resumption state").unwrap();
        assert_eq!(b.decrypt(&ticket).unwrap(), b"resumption state");
        let (_, now) = clock(100 * P);
        let stranger = SharedTicketer::new(&[[8; 32]], now);
        assert_eq!(stranger.decrypt(&ticket), None);
    }

    #[test]
    fn tickets_expire_after_the_previous_period() {
        let (t, now) = clock(100 * P + 1);
        let a = SharedTicketer::new(&[[7; 32]], now);
        let ticket = a.encrypt(b"s").unwrap();
        t.store(101 * P + 1, Ordering::Relaxed);
        assert_eq!(
            a.decrypt(&ticket).unwrap(),
            b"s",
            "previous period accepted"
        );
        t.store(102 * P, Ordering::Relaxed);
        assert_eq!(a.decrypt(&ticket), None, "two periods old is erased");
        t.store(99 * P, Ordering::Relaxed);
        assert_eq!(a.decrypt(&ticket), None, "from the future");
    }

    #[test]
    fn rotation_keeps_old_tickets_valid() {
        let (_, now) = clock(5 * P);
        let old = SharedTicketer::new(&[[1; 32]], now);
        let ticket = old.encrypt(b"s").unwrap();
        let (_, now) = clock(5 * P);
        let rotated = SharedTicketer::new(&[[2; 32], [1; 32]], now);
        assert_eq!(rotated.decrypt(&ticket).unwrap(), b"s");
        let fresh = rotated.encrypt(b"s").unwrap();
        assert_eq!(old.decrypt(&fresh), None, "new tickets use the first key");
    }

    #[test]
    fn tampered_or_short_tickets_are_refused() {
        let (_, now) = clock(3 * P);
        let a = SharedTicketer::new(&[[7; 32]], now);
        let ticket = a.encrypt(b"state").unwrap();
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(a.decrypt(&bad), None, "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert_eq!(a.decrypt(&ticket[..len]), None);
        }
    }

    #[test]
    fn load_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = SharedKeys::load(dir.path()).unwrap_err();
        assert!(err.contains(RESET_KEY_FILE), "{err}");
        std::fs::write(dir.path().join(RESET_KEY_FILE), [1u8; 32]).unwrap();
        std::fs::write(dir.path().join(TOKEN_KEY_FILE), [2u8; 16]).unwrap();
        let err = SharedKeys::load(dir.path()).unwrap_err();
        assert!(
            err.contains(TOKEN_KEY_FILE) && err.contains("16 bytes"),
            "{err}"
        );
        std::fs::write(dir.path().join(TOKEN_KEY_FILE), [2u8; 32]).unwrap();
        std::fs::write(dir.path().join(TICKET_KEYS_FILE), [3u8; 40]).unwrap();
        let err = SharedKeys::load(dir.path()).unwrap_err();
        assert!(err.contains("multiple of 32"), "{err}");
        std::fs::write(dir.path().join(TICKET_KEYS_FILE), [3u8; 64]).unwrap();
        let keys = SharedKeys::load(dir.path()).unwrap();
        assert_eq!(keys.tickets.len(), 2);
    }

    #[test]
    fn the_cid_key_depends_on_the_reset_key_only() {
        let a = SharedKeys::from_parts(vec![1; 32], vec![2; 32], &[3; 32]).unwrap();
        let b = SharedKeys::from_parts(vec![1; 32], vec![9; 32], &[9; 32]).unwrap();
        let c = SharedKeys::from_parts(vec![4; 32], vec![2; 32], &[3; 32]).unwrap();
        assert_eq!(a.cid_key(), b.cid_key());
        assert_ne!(a.cid_key(), c.cid_key());
    }
}
