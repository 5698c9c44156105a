//! Sending frames to the peer from the driver thread itself.
//!
//! The driver writes queued frames with one non-blocking `writev` per channel and loop
//! iteration: no hand-off to another thread on the hot path. Only when the socket buffer
//! is full does the rest go to a tokio task that waits for the socket to drain; until that
//! task reports it has written everything it was given, later frames follow it there, so
//! the order on the wire never changes. Payloads are shared (`Arc`), never copied.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::shell::disk::AlignedBuf;

/// One encoded frame: header and fields, then the block data if any.
pub struct Frame {
    pub head: Vec<u8>,
    pub data: Option<Arc<AlignedBuf>>,
    /// Bytes of this frame already written.
    pub done: usize,
}

impl Frame {
    fn len(&self) -> usize {
        self.head.len() + self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// What the backlog task reports.
pub enum TaskReport {
    /// Everything up to hand-off number `handoff` is on the wire.
    Drained {
        handoff: u64,
    },
    Failed(String),
}

pub struct SendQueue {
    sock: std::net::TcpStream,
    queued: VecDeque<Frame>,
    task: Option<mpsc::UnboundedSender<(u64, Vec<Frame>)>>,
    handoffs: u64,
    drained: u64,
}

impl SendQueue {
    /// `sock` is a second descriptor of the task's socket (non-blocking, as tokio set it).
    pub fn new(sock: std::net::TcpStream, task: mpsc::UnboundedSender<(u64, Vec<Frame>)>) -> Self {
        SendQueue {
            sock,
            queued: VecDeque::new(),
            task: Some(task),
            handoffs: 0,
            drained: 0,
        }
    }

    pub fn push(&mut self, head: Vec<u8>, data: Option<Arc<AlignedBuf>>) {
        self.queued.push_back(Frame {
            head,
            data,
            done: 0,
        });
    }

    fn backlogged(&self) -> bool {
        self.drained < self.handoffs
    }

    pub fn on_report(&mut self, handoff: u64) {
        self.drained = self.drained.max(handoff);
    }

    /// Write what is queued; what the socket does not take now goes to the task.
    pub fn flush(&mut self) -> Result<(), String> {
        if self.queued.is_empty() {
            return Ok(());
        }
        if !self.backlogged() {
            self.write_direct()?;
        }
        if !self.queued.is_empty() {
            self.hand_off();
        }
        Ok(())
    }

    fn write_direct(&mut self) -> Result<(), String> {
        while !self.queued.is_empty() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(64);
            for f in self.queued.iter().take(512) {
                let mut skip = f.done;
                if skip < f.head.len() {
                    slices.push(IoSlice::new(&f.head[skip..]));
                    skip = 0;
                } else {
                    skip -= f.head.len();
                }
                if let Some(d) = &f.data {
                    if skip < d.len() {
                        slices.push(IoSlice::new(&d.as_slice()[skip..]));
                    }
                }
            }
            let mut n = match self.sock.write_vectored(&slices) {
                Ok(0) => return Err("send: connection closed".into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("send: {e}")),
            };
            while n > 0 {
                let Some(f) = self.queued.front_mut() else {
                    break;
                };
                let left = f.len() - f.done;
                if n >= left {
                    n -= left;
                    self.queued.pop_front();
                } else {
                    f.done += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    fn hand_off(&mut self) {
        let frames: Vec<Frame> = self.queued.drain(..).collect();
        self.handoffs += 1;
        if let Some(t) = &self.task {
            let _ = t.send((self.handoffs, frames));
        }
    }

    /// Flush, then let the task finish and close the socket.
    pub fn close(&mut self) {
        let _ = self.flush();
        self.task = None;
    }
}

/// The backlog task: writes what the driver could not, then reports; closes the write
/// side when the driver lets go.
pub async fn backlog_task(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(u64, Vec<Frame>)>,
    report: impl Fn(TaskReport),
) {
    while let Some((handoff, frames)) = rx.recv().await {
        for f in frames {
            let r = async {
                if f.done < f.head.len() {
                    w.write_all(&f.head[f.done..]).await?;
                }
                if let Some(d) = &f.data {
                    let skip = f.done.saturating_sub(f.head.len());
                    w.write_all(&d.as_slice()[skip..]).await?;
                }
                Ok::<_, std::io::Error>(())
            }
            .await;
            if let Err(e) = r {
                report(TaskReport::Failed(format!("send: {e}")));
                return;
            }
        }
        // Only when nothing more is queued: later hand-offs are reported after they drain.
        if rx.is_empty() {
            report(TaskReport::Drained { handoff });
        }
    }
    let _ = w.shutdown().await;
}
