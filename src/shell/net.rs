//! Peer transport: framed, CRC-checked messages over TCP, opened by the mutual
//! challenge-response of `core::auth`.
//!
//! Block data is read straight into an aligned buffer, ready for O_DIRECT. Every step of
//! the handshake has a deadline, so a silent or hostile client cannot hold a listener.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::core::auth::{AuthError, Connector, Listener};
use crate::core::wire::{FrameHeader, Msg, WireError, HEADER_BYTES};
use crate::shell::disk::AlignedBuf;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Wire(#[from] WireError),
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("handshake timed out")]
    Timeout,
    #[error("unexpected message {0}")]
    Unexpected(&'static str),
}

/// The shared secret from its file (surrounding whitespace trimmed); at least 16 bytes,
/// and readable by its owner only (as ssh insists for its keys).
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{}: cannot read secret: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: the secret is accessible to others (mode {:04o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    let s =
        std::fs::read(path).map_err(|e| format!("{}: cannot read secret: {e}", path.display()))?;
    let s = s.trim_ascii().to_vec();
    if s.len() < 16 {
        return Err(format!(
            "{}: secret is {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom | base64`)",
            path.display(),
            s.len()
        ));
    }
    Ok(s)
}

/// 32 bytes from the kernel's random source.
pub fn random_nonce() -> io::Result<[u8; 32]> {
    use std::io::Read;
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// One frame as read: the message, the sender's term from its header, its block data.
pub struct Frame {
    pub msg: Msg,
    pub term: u64,
    pub data: Option<AlignedBuf>,
}

/// Frames before authentication (and witness requests) are small and carry no block
/// data: a peer that has not proven the secret gets no large buffer.
pub const SMALL_FRAME_FIELDS_BYTES: u32 = 4096;

/// Unauthenticated connections a listener serves at once; more are closed at once.
pub const MAX_HANDSHAKES: usize = 64;

/// Admission of unauthenticated connections: at most [`MAX_HANDSHAKES`] in their
/// handshake at once, so that a flood of connections costs a bounded amount of memory.
/// Refusals are logged once per burst.
pub struct Admission {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    refusing: std::sync::atomic::AtomicBool,
}

impl Admission {
    pub fn new(limit: usize) -> Admission {
        Admission {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(limit)),
            refusing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A slot for one handshake, held until it ends; `None`: close the connection.
    pub fn admit(&self, from: std::net::SocketAddr) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering;
        match self.slots.clone().try_acquire_owned() {
            Ok(p) => {
                if self.refusing.swap(false, Ordering::Relaxed) {
                    tracing::info!("connections in their handshake below the limit again");
                }
                Some(p)
            }
            Err(_) => {
                if !self.refusing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%from, limit = MAX_HANDSHAKES, "too many connections in their handshake: closing new ones until some finish");
                }
                None
            }
        }
    }
}

/// A frame from an authenticated peer (fields up to 64 KiB, data up to 1 MiB).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, NetError> {
    read_frame_within(r, u32::MAX, true).await
}

/// A frame of the handshake, or a witness request: at most
/// [`SMALL_FRAME_FIELDS_BYTES`] of fields and no data, checked before anything is
/// allocated for it.
pub async fn read_small_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, NetError> {
    read_frame_within(r, SMALL_FRAME_FIELDS_BYTES, false).await
}

async fn read_frame_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max_fields: u32,
    data_allowed: bool,
) -> Result<Frame, NetError> {
    let mut h = [0u8; HEADER_BYTES];
    r.read_exact(&mut h).await?;
    let hdr = FrameHeader::decode(&h)?;
    if hdr.fields_len > max_fields || (hdr.data_len > 0 && !data_allowed) {
        return Err(NetError::Wire(WireError::TooLarge(
            hdr.fields_len,
            hdr.data_len,
        )));
    }
    let mut fields = vec![0u8; hdr.fields_len as usize];
    r.read_exact(&mut fields).await?;
    let data = if hdr.data_len > 0 {
        let mut b = AlignedBuf::zeroed(hdr.data_len as usize);
        r.read_exact(b.as_mut_slice()).await?;
        Some(b)
    } else {
        None
    };
    finish(&hdr, &fields, data)
}

/// Reads frames from a non-blocking socket as bytes arrive, for a driver that is told
/// when the socket is readable (io_uring poll) instead of running a reader task.
///
/// Small frames are parsed out of one receive buffer; the block data of a large frame is
/// read straight into its aligned buffer, so bulk data is not copied twice.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    partial: Option<Partial>,
}

/// A frame whose header and fields are in, and whose data is still arriving.
struct Partial {
    hdr: FrameHeader,
    fields: Vec<u8>,
    data: AlignedBuf,
    filled: usize,
}

/// What [`FrameReader::read_available`] found after the frames it returned.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadState {
    /// The socket has nothing more for now.
    WouldBlock,
    /// The read budget is used up; more may be waiting.
    Budget,
    /// The peer closed the connection.
    Eof,
}

/// Receive buffer: one maximal header and fields, plus room for many small frames.
const RX_BUF_BYTES: usize = 256 << 10;
/// Data at least this long that is not yet in the buffer is read straight into place.
const DIRECT_DATA_BYTES: usize = 32 << 10;

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            buf: vec![0u8; RX_BUF_BYTES],
            start: 0,
            end: 0,
            partial: None,
        }
    }
}

impl FrameReader {
    /// Read what `r` has, up to about `budget_bytes`, and append every complete frame
    /// to `out`. Frames before a bad one are still returned, then the error.
    pub fn read_available<R: std::io::Read>(
        &mut self,
        r: &mut R,
        out: &mut Vec<Frame>,
        budget_bytes: usize,
    ) -> Result<ReadState, NetError> {
        let mut read_bytes = 0usize;
        loop {
            self.parse(out)?;
            if read_bytes >= budget_bytes {
                return Ok(ReadState::Budget);
            }
            let direct = match &mut self.partial {
                Some(p)
                    if self.start == self.end && p.data.len() - p.filled >= DIRECT_DATA_BYTES =>
                {
                    Some(&mut p.data.as_mut_slice()[p.filled..])
                }
                _ => None,
            };
            let res = match direct {
                Some(dst) => r.read(dst).inspect(|&n| {
                    if let Some(p) = &mut self.partial {
                        p.filled += n;
                    }
                }),
                None => {
                    if self.start > 0 {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                    }
                    let end = self.end;
                    r.read(&mut self.buf[end..]).inspect(|&n| self.end += n)
                }
            };
            match res {
                Ok(0) => {
                    self.parse(out)?;
                    return Ok(ReadState::Eof);
                }
                Ok(n) => read_bytes += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(ReadState::WouldBlock)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(NetError::Io(e)),
            }
        }
    }

    /// Take every complete frame out of the buffer.
    fn parse(&mut self, out: &mut Vec<Frame>) -> Result<(), NetError> {
        loop {
            if let Some(p) = &mut self.partial {
                let n = (self.end - self.start).min(p.data.len() - p.filled);
                p.data.as_mut_slice()[p.filled..p.filled + n]
                    .copy_from_slice(&self.buf[self.start..self.start + n]);
                p.filled += n;
                self.start += n;
                if p.filled < p.data.len() {
                    return Ok(());
                }
                if let Some(p) = self.partial.take() {
                    out.push(finish(&p.hdr, &p.fields, Some(p.data))?);
                }
                continue;
            }
            let avail = &self.buf[self.start..self.end];
            let Some(h) = avail.get(..HEADER_BYTES) else {
                return Ok(());
            };
            let mut hb = [0u8; HEADER_BYTES];
            hb.copy_from_slice(h);
            let hdr = FrameHeader::decode(&hb)?;
            let flen = hdr.fields_len as usize;
            let Some(fields) = avail.get(HEADER_BYTES..HEADER_BYTES + flen) else {
                return Ok(());
            };
            let fields = fields.to_vec();
            self.start += HEADER_BYTES + flen;
            if hdr.data_len == 0 {
                out.push(finish(&hdr, &fields, None)?);
            } else {
                self.partial = Some(Partial {
                    hdr,
                    fields,
                    data: AlignedBuf::zeroed(hdr.data_len as usize),
                    filled: 0,
                });
            }
        }
    }
}

fn finish(hdr: &FrameHeader, fields: &[u8], data: Option<AlignedBuf>) -> Result<Frame, NetError> {
    hdr.check_crc(fields, data.as_ref().map_or(&[][..], |d| d.as_slice()))?;
    Ok(Frame {
        msg: Msg::decode(hdr, fields)?,
        term: hdr.term,
        data,
    })
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Msg,
    data: &[u8],
) -> Result<(), NetError> {
    if data.len() as u32 != msg.data_len() {
        return Err(NetError::Wire(WireError::Malformed("data length of")));
    }
    // Handshake and witness frames carry no term; replication frames are encoded by the
    // driver with its own.
    w.write_all(&msg.encode(0, data)).await?;
    if !data.is_empty() {
        w.write_all(data).await?;
    }
    Ok(())
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, NetError>>,
) -> Result<T, NetError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| NetError::Timeout)?
}

/// What an accepted connection says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub resource: String,
    pub node: String,
    pub channel: u8,
}

/// Open an authenticated connection and say which resource and channel it is for.
pub async fn connect(
    addr: std::net::SocketAddr,
    secret: &[u8],
    attach: &Attached,
) -> Result<TcpStream, NetError> {
    let nonce = random_nonce()?;
    timed(async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (c, challenge) = Connector::start(secret, nonce)?;
        write_frame(&mut s, &challenge, &[]).await?;
        let resp = read_small_frame(&mut s).await?.msg;
        let proof = c.on_response(&resp)?;
        write_frame(&mut s, &proof, &[]).await?;
        let a = Msg::Attach {
            resource: attach.resource.clone(),
            node: attach.node.clone(),
            channel: attach.channel,
        };
        write_frame(&mut s, &a, &[]).await?;
        Ok(s)
    })
    .await
}

/// Authenticate an accepted connection. Any failure is returned for the caller to log
/// once and drop; the listener goes on serving.
pub async fn accept(mut s: TcpStream, secret: &[u8]) -> Result<(TcpStream, Attached), NetError> {
    let nonce = random_nonce()?;
    timed(async {
        s.set_nodelay(true)?;
        let mut l = Listener::new(secret, nonce)?;
        let challenge = read_small_frame(&mut s).await?.msg;
        let resp = l.on_challenge(&challenge)?;
        write_frame(&mut s, &resp, &[]).await?;
        let proof = read_small_frame(&mut s).await?.msg;
        l.on_proof(&proof)?;
        match read_small_frame(&mut s).await? {
            Frame {
                msg:
                    Msg::Attach {
                        resource,
                        node,
                        channel,
                    },
                data: None,
                ..
            } => Ok(Attached {
                resource,
                node,
                channel,
            }),
            _ => Err(NetError::Unexpected("instead of attach")),
        }
    })
    .await
    .map(|a| (s, a))
}

/// `Attach.channel` of a connection to the witness.
pub const WITNESS_CHANNEL: u8 = 2;

/// A data node's connection to the witness: one request, one reply.
pub struct WitnessClient {
    s: TcpStream,
}

impl WitnessClient {
    pub async fn connect(
        addr: std::net::SocketAddr,
        secret: &[u8],
        node: &str,
    ) -> Result<WitnessClient, NetError> {
        let s = connect(
            addr,
            secret,
            &Attached {
                resource: String::new(),
                node: node.to_string(),
                channel: WITNESS_CHANNEL,
            },
        )
        .await?;
        Ok(WitnessClient { s })
    }

    pub async fn call(
        &mut self,
        req: crate::core::witness::Request,
    ) -> Result<crate::core::witness::Reply, NetError> {
        write_frame(&mut self.s, &Msg::WitnessRequest(req), &[]).await?;
        match read_small_frame(&mut self.s).await? {
            Frame {
                msg: Msg::WitnessReply(r),
                data: None,
                ..
            } => Ok(r),
            _ => Err(NetError::Unexpected("instead of a witness reply")),
        }
    }
}
