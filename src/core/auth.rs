//! Mutual HMAC-SHA256 challenge-response between two nodes sharing a secret.
//!
//! ```text
//! connector                                 listener
//!   AuthChallenge{nc}            ───────▶
//!                                ◀───────   AuthResponse{nl, HMAC(k, "L" | nc | nl)}
//!   AuthProof{HMAC(k, "C" | nl | nc)} ───▶
//! ```
//!
//! Each side proves it knows the secret over the other side's fresh nonce, and the role
//! labels keep one side's answer from being replayed as the other's. Nonces come in from
//! the driver (the core has no randomness of its own).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::core::wire::Msg;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("peer failed authentication (wrong shared secret?)")]
    BadMac,
    #[error("unexpected message during authentication")]
    Unexpected,
    #[error("the shared secret is empty")]
    EmptySecret,
}

fn mac(secret: &[u8], label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail; an empty key is refused
    // before we get here.
    let mut m = HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(label);
    m.update(a);
    m.update(b);
    m
}

fn tag(m: HmacSha256) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&m.finalize().into_bytes());
    out
}

/// The side that opened the connection.
pub struct Connector {
    secret: Vec<u8>,
    nonce: [u8; 32],
}

impl Connector {
    /// Start: returns the first message to send.
    pub fn start(secret: &[u8], nonce: [u8; 32]) -> Result<(Connector, Msg), AuthError> {
        if secret.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        Ok((
            Connector {
                secret: secret.to_vec(),
                nonce,
            },
            Msg::AuthChallenge { nonce },
        ))
    }

    /// Check the listener's response; on success returns the proof to send, after which
    /// the connection is authenticated on this side.
    pub fn on_response(&self, msg: &Msg) -> Result<Msg, AuthError> {
        let Msg::AuthResponse { nonce: nl, mac: m } = msg else {
            return Err(AuthError::Unexpected);
        };
        mac(&self.secret, b"L", &self.nonce, nl)
            .verify_slice(m)
            .map_err(|_| AuthError::BadMac)?;
        Ok(Msg::AuthProof {
            mac: tag(mac(&self.secret, b"C", nl, &self.nonce)),
        })
    }
}

/// The side that accepted the connection.
pub struct Listener {
    secret: Vec<u8>,
    nonce: [u8; 32],
    peer_nonce: Option<[u8; 32]>,
}

impl Listener {
    pub fn new(secret: &[u8], nonce: [u8; 32]) -> Result<Listener, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        Ok(Listener {
            secret: secret.to_vec(),
            nonce,
            peer_nonce: None,
        })
    }

    pub fn on_challenge(&mut self, msg: &Msg) -> Result<Msg, AuthError> {
        let Msg::AuthChallenge { nonce: nc } = msg else {
            return Err(AuthError::Unexpected);
        };
        self.peer_nonce = Some(*nc);
        Ok(Msg::AuthResponse {
            nonce: self.nonce,
            mac: tag(mac(&self.secret, b"L", nc, &self.nonce)),
        })
    }

    /// Check the connector's proof: `Ok` means the peer is authenticated.
    pub fn on_proof(&self, msg: &Msg) -> Result<(), AuthError> {
        let (Msg::AuthProof { mac: m }, Some(nc)) = (msg, self.peer_nonce) else {
            return Err(AuthError::Unexpected);
        };
        mac(&self.secret, b"C", &self.nonce, &nc)
            .verify_slice(m)
            .map_err(|_| AuthError::BadMac)
    }
}
