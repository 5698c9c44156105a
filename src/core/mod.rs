//! The sans-IO core: everything that decides, nothing that does.
//!
//! The core never touches a socket, a file, a thread or a clock. Time comes in as
//! [`Instant`] values with every event; randomness comes in as a seed. The shells
//! (`crate::shell`) and the deterministic simulator (`tests/sim/`) drive the same code.

pub mod al;
pub mod auth;
pub mod bitmap;
pub mod codec;
pub mod meta;
pub mod node;
pub mod promoter;
pub mod quorum;
pub mod resource;
pub mod uuid;
pub mod wire;
pub mod witness;
pub mod witness_link;

/// A point in time, in milliseconds since an arbitrary origin chosen by the driver.
///
/// The core only compares and subtracts instants; it never asks what time it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(pub u64);

impl Instant {
    pub fn plus_ms(self, ms: u64) -> Instant {
        Instant(self.0.saturating_add(ms))
    }
    pub fn ms_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Replication protocol, as DRBD defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// Complete when on the local disk and handed to the send buffer.
    A,
    /// Complete when on the local disk and received by the peer.
    B,
    /// Complete when on the local disk and on the peer's disk.
    C,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "A" => Some(Protocol::A),
            "B" => Some(Protocol::B),
            "C" => Some(Protocol::C),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        }
    }
}

/// Small deterministic PRNG (splitmix64): the core's only source of "randomness", seeded
/// from outside so that the simulator replays exactly.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}
