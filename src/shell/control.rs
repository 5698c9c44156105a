//! The control socket between `tandemctl` and `tandemd`: one JSON request per line, one
//! JSON reply per line (`events` keeps sending one line per state change).
//!
//! The socket is root-only twice over: it is created mode 0600 in a 0700 directory, and
//! the daemon checks each client's uid with `SO_PEERCRED`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {
        resource: Option<String>,
    },
    Events {
        resource: Option<String>,
    },
    Promote {
        resource: String,
        #[serde(default)]
        force: bool,
    },
    Demote {
        resource: String,
    },
    Connect {
        resource: String,
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect {
        resource: String,
    },
    Invalidate {
        resource: String,
    },
    Switchover {
        resource: String,
        /// The node to hand over to (with two nodes: the peer).
        #[serde(default)]
        to: Option<String>,
    },
    AdoptWitness {
        resource: String,
        #[serde(default)]
        force: bool,
    },
}

impl Request {
    pub fn resource(&self) -> Option<&str> {
        match self {
            Request::Status { resource } | Request::Events { resource } => resource.as_deref(),
            Request::Promote { resource, .. }
            | Request::Demote { resource }
            | Request::Connect { resource, .. }
            | Request::Disconnect { resource }
            | Request::Invalidate { resource }
            | Request::Switchover { resource, .. }
            | Request::AdoptWitness { resource, .. } => Some(resource),
        }
    }
}

/// The longest request line the daemon reads; a longer one is refused and the
/// connection closed, without buffering it.
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// One line read from a control connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(String),
    TooLong,
    Eof,
}

/// Read one request line, holding at most [`MAX_LINE_BYTES`] of it in memory.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE_BYTES {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text(String::from_utf8_lossy(&buf).into_owned()))
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`: one object per resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Vec<crate::shell::status::ResourceStatus>>,
}

impl Reply {
    pub fn ok(message: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            message: Some(message.into()),
            ..Reply::default()
        }
    }
    pub fn err(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(error.into()),
            ..Reply::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach tandemd at {path}: {err} (is it running? use --socket or TANDEM_SOCKET)"
    )]
    Connect { path: String, err: std::io::Error },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("tandemd sent a reply this tandemctl cannot read: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("tandemd closed the connection without a reply")]
    Closed,
    #[error("{path}: permission denied: the control socket is root-only; run tandemctl as root")]
    RootOnly { path: String },
}

/// A client connection to the daemon.
pub struct Client {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).await.map_err(|err| {
            if err.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::RootOnly {
                    path: path.display().to_string(),
                }
            } else {
                ClientError::Connect {
                    path: path.display().to_string(),
                    err,
                }
            }
        })?;
        let (r, w) = s.into_split();
        Ok(Client {
            lines: BufReader::new(r).lines(),
            w,
        })
    }

    pub async fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.w.write_all(&line).await?;
        Ok(())
    }

    /// The next line from the daemon, as raw JSON text.
    pub async fn next_line(&mut self) -> Result<String, ClientError> {
        self.lines.next_line().await?.ok_or(ClientError::Closed)
    }

    pub async fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let sent = self.send(req).await;
        // A daemon that refuses this client (not root) may answer and close before the
        // request is even written: its answer is still there to read.
        match self.next_line().await {
            Ok(line) => Ok(serde_json::from_str(&line)?),
            Err(e) => Err(sent.err().unwrap_or(e)),
        }
    }
}
