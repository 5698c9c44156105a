//! The per-resource driver: one OS thread owns a core [`Node`] (the [`Resource`], its
//! services and role steps) and carries out its actions against the backing disk, the
//! peer connections, the frontend, the block device and the services. It decides
//! nothing: every wait, role step and escalation is the node's.
//!
//! The driver thread owns the core and the backing disk's io_uring. With the ring it
//! reads the frontend's requests (a [`Frontend`]; it does not know which) and peer frames
//! itself: readiness polls on the frontend's descriptor and on the peer sockets sit in
//! the same ring as the disk requests. Everything else that happens
//! to the resource arrives as an [`Event`] on one channel: accepted connections, admin
//! commands, witness replies. The thread handles what is there, drains the core's
//! actions, and sleeps in `io_uring_enter` until a disk completion, a readable device or
//! socket, a new event (an eventfd the ring watches) or the core's next deadline. An
//! application write thus crosses no thread inside the daemon: the driver reads it from
//! the frontend, submits it to the disk, reaps the completion and answers it itself;
//! a flush is an fdatasync on this thread. No lock is shared with the hot path: the core
//! is owned by this thread alone. Where io_uring is not allowed, a disk worker thread
//! (pread/pwrite) sends completions as events and the frontend's reader thread sends
//! requests.
//!
//! Peer connections: two TCP connections per peer, `data` (writes, resync) and `meta`
//! (acks, pings), so that acknowledgements never wait behind bulk data. The node whose
//! name sorts first dials, with backoff; the other accepts. The driver writes frames to
//! the sockets itself, and with a ring it reads them itself too: a readiness poll on
//! each socket sits in the same ring as the disk requests, so a peer's frame reaches
//! the core without a hand-off from a reader task (without a ring, tokio reader tasks
//! send frames as events).
//!
//! The witness: one task per resource keeps an authenticated connection and carries the
//! core's requests, one at a time, each answered within its timeout or reported as
//! unanswered (and the connection dropped, so that a late reply cannot be taken for the
//! next request's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::core::node::{self, AttachOutcome, DetachOutcome, Node, NodeParams, Origin};
use crate::core::promoter::OnDemoteFailure;
use crate::core::resource::{
    Action, AdminCmd, BufId, IoId, ReqError, ReqId, Resource, Role, StateKey,
};
use crate::core::wire::{Channel, Msg};
use crate::core::witness;
use crate::core::Instant;
use crate::shell::control::Reply;
use crate::shell::disk::{AlignedBuf, Completion, Disk, DiskOp, Ring};
use crate::shell::frontend::{
    self, AppRequest, BlockDevice, Frontend, ReadDone, RequestState, SECTOR_BYTES,
};
use crate::shell::fuse_loop::FuseLoop;
use crate::shell::net::{self, Attached};
use crate::shell::sendq::{self, SendQueue};
use crate::shell::services::{self, Service};
use crate::shell::status::{AppWrites, IoBackend, ResourceStatus, ServiceEntry, ServicesStatus};

mod actions;
mod admin;
mod inputs;
mod peer;
mod report;
mod start;
mod tasks;

pub use start::{start, StartError};
use tasks::{run_fence_peer, witness_task, FencePeerEnv};

/// Buffers received from the peer; apart from application writes (their request
/// number) and the core's own reads (`CORE_BUF_BIT`).
const RX_BUF_BIT: u64 = 1 << 62;
/// Disk tags of application reads, apart from the core's I/O numbers.
const APP_READ_BIT: u64 = 1 << 62;
/// Disk tag of the fdatasync that completes a metadata write.
const META_SYNC_BIT: u64 = 1 << 61;

/// Ring tags of the readiness polls on peer sockets: connection number and channel.
const NET_POLL_BIT: u64 = 1 << 63;
/// Bytes read from one peer socket per readiness, so that a flood on one channel does
/// not hold up the disk and the other channel.
const RX_BUDGET_BYTES: usize = 4 << 20;

/// Ring tag of the readiness poll on the frontend: that of connection 0, which never
/// exists (connections are numbered from 1).
const FRONTEND_POLL_TAG: u64 = NET_POLL_BIT;
/// Frontend requests taken per readiness, so that a burst does not hold up the peer.
const FRONTEND_BUDGET_REQUESTS: usize = 256;

fn net_poll_tag(conn: u64, channel: usize) -> u64 {
    NET_POLL_BIT | (conn << 1) | channel as u64
}

/// How long the second channel may lag behind the first one's clean close.
const HALF_CLOSE_GRACE: Duration = Duration::from_millis(500);

const DIAL_BACKOFF_MIN_MS: u64 = 50;
const DIAL_BACKOFF_MAX_MS: u64 = 1000;

pub enum Event {
    App(AppRequest),
    Disk(Completion),
    Accepted {
        node: String,
        channel: u8,
        stream: TcpStream,
    },
    Dialed {
        result: Result<(TcpStream, TcpStream), String>,
    },
    PeerMsg {
        conn: u64,
        term: u64,
        msg: Msg,
        data: Option<AlignedBuf>,
    },
    /// The witness answered the core's request (`None`: no answer in time).
    WitnessReply(Option<witness::Reply>),
    /// The `fence-peer` handler exited with this code (`None`: it did not, by itself).
    FencePeerDone(Option<i32>),
    /// A service's start or stop finished.
    ServiceDone {
        idx: usize,
        result: Result<(), String>,
    },
    /// A connection ended; `eof` when the peer closed it cleanly.
    PeerDown {
        conn: u64,
        reason: String,
        eof: bool,
    },
    /// The backlog task of a channel finished or failed.
    SendReport {
        conn: u64,
        channel: usize,
        report: sendq::TaskReport,
    },
    /// The grace period after one channel's clean close is over.
    PeerGrace {
        conn: u64,
    },
    Admin {
        cmd: AdminCmd,
        reply: oneshot::Sender<Reply>,
    },
    Status {
        reply: oneshot::Sender<ResourceStatus>,
    },
    /// Whether the device is still held, checked off the driver thread (`busy`: why it
    /// cannot go).
    DeviceChecked {
        busy: Option<String>,
    },
    /// The device was attached (`dev`: the device made, if any).
    DeviceAttached {
        dev: Option<PathBuf>,
        outcome: AttachOutcome,
    },
    /// The device was detached, or was not because it is in use.
    DeviceDetached(DetachOutcome),
    /// Stop: the node stops the services, demotes and waits until nothing is in flight;
    /// then the thread lets the device go. At `give_up_at` it stops even with I/O still
    /// in flight (it fails), so the loop device and the FUSE mount never outlive the
    /// daemon.
    Shutdown {
        reply: oneshot::Sender<()>,
        give_up_at: std::time::Instant,
    },
}

/// Wakes the driver thread when it sleeps in the ring.
struct Waker {
    efd: OwnedFd,
    sleeping: AtomicBool,
}

/// The sending side of a driver's event channel; any thread may send.
#[derive(Clone)]
pub struct EventTx {
    tx: std::sync::mpsc::Sender<Event>,
    waker: Arc<Waker>,
}

impl EventTx {
    /// Queue an event; `false` once the driver has stopped.
    pub fn send(&self, ev: Event) -> bool {
        if self.tx.send(ev).is_err() {
            return false;
        }
        // Only a sleeping driver needs the system call.
        if self.waker.sleeping.swap(false, Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            let _ = nix::unistd::write(&self.waker.efd, &one);
        }
        true
    }
}

/// What the daemon keeps of a running resource.
#[derive(Clone)]
pub struct Handle {
    pub name: String,
    pub tx: EventTx,
    pub events: broadcast::Sender<String>,
}

enum Backing {
    /// The driver thread owns the ring.
    Ring(Box<Ring>),
    /// A worker thread does pread/pwrite and sends completions as events.
    Thread(Disk),
}

/// How the driver reaches its peer.
pub struct PeerSetup {
    pub local_node: String,
    pub peer_node: String,
    pub peer_addr: std::net::SocketAddr,
    pub secret: Arc<Vec<u8>>,
    pub witness_addr: Option<std::net::SocketAddr>,
    /// The `fence-peer` handler (`fencing = "stonith"`), run with `sh -c`.
    pub fence_peer: Option<String>,
}

pub struct Setup {
    /// The resource; the driver makes the [`Node`] around it.
    pub core: Resource,
    /// The promoter's services, in start order.
    pub services: Vec<Service>,
    pub on_demote_failure: OnDemoteFailure,
    pub disk_path: PathBuf,
    pub peer: PeerSetup,
    pub link: PathBuf,
    pub mountpoint: PathBuf,
    /// Force the pread/pwrite backend (tests of the fallback).
    pub want_uring: bool,
}

enum IoKind {
    Write,
    Read { buf: BufId },
    Flush,
    Meta,
    MetaSync { io: IoId },
}

struct PeerConn {
    id: u64,
    /// Data channel, then meta channel.
    out: [SendQueue; 2],
    /// Reader tasks, where the driver has no ring to poll the sockets in.
    readers: Vec<JoinHandle<()>>,
    /// With a ring: per channel, the socket the driver reads itself when the ring says
    /// it is readable; `None` once that channel has ended.
    rx: [Option<RxChannel>; 2],
    /// One channel has been closed cleanly by the peer: the other may still deliver
    /// what the peer sent before it closed.
    half_closed: bool,
}

struct RxChannel {
    sock: std::net::TcpStream,
    reader: net::FrameReader,
}

struct PendingRead {
    skip: usize,
    len: usize,
    done: ReadDone,
}

struct Driver {
    name: String,
    node: Node,
    disk: Backing,
    disk_path: PathBuf,
    start: std::time::Instant,
    rt: tokio::runtime::Handle,
    tx: EventTx,
    waker: Arc<Waker>,
    events: broadcast::Sender<String>,
    last_key: Option<StateKey>,
    bufs: HashMap<u64, Arc<AlignedBuf>>,
    ios: HashMap<u64, IoKind>,
    next_req: u64,
    next_rx_buf: u64,
    next_read: u64,
    /// Application writes in flight, with when they arrived.
    writes: HashMap<u64, (frontend::WriteDone, std::time::Instant)>,
    /// Completed application writes and the sum of their latencies (for `/metrics`).
    writes_done: u64,
    write_latency_us_sum: u64,
    flushes: HashMap<u64, frontend::FlushDone>,
    reads: HashMap<u64, PendingRead>,
    peer: PeerSetup,
    dialer: bool,
    want_connect: bool,
    conn: Option<PeerConn>,
    next_conn: u64,
    dialing: bool,
    backoff_ms: u64,
    dial_failures: u64,
    pending_data: Option<TcpStream>,
    /// Where the application's requests come from (FUSE + loop today).
    frontend: Box<dyn Frontend>,
    /// What makes the device appear and go, for the helper threads that do it.
    device: Arc<dyn BlockDevice>,
    /// Reused for the requests of one frontend readiness.
    frontend_reqs: Vec<AppRequest>,
    link: PathBuf,
    /// The device made for the primary (the loop device), while there is one.
    loop_dev: Option<PathBuf>,
    /// Answered once the node says it has stopped ([`node::Action::Stopped`]).
    shutdown: Option<oneshot::Sender<()>>,
    /// The node has stopped: the run loop ends.
    stopped: bool,
    witness_tx: Option<mpsc::UnboundedSender<(witness::Request, u64)>>,
    /// Operator commands waiting for the node's answer, by [`Origin::Operator`] number.
    replies: HashMap<u64, oneshot::Sender<Reply>>,
    next_reply: u64,
    services: Arc<Vec<Service>>,
    /// The start or stop running for the promoter; aborted when it runs too long.
    service_task: Option<tokio::task::AbortHandle>,
}

impl Driver {
    fn now(&self) -> Instant {
        Instant(self.start.elapsed().as_millis() as u64)
    }

    fn submit(&mut self, tag: u64, op: DiskOp) {
        match &mut self.disk {
            Backing::Ring(r) => r.submit(tag, op),
            Backing::Thread(d) => d.submit(tag, op),
        }
    }

    fn run(mut self, rx: std::sync::mpsc::Receiver<Event>) {
        self.drain();
        self.report_changes();
        loop {
            let mut progressed = false;
            while let Ok(ev) = rx.try_recv() {
                self.handle(ev);
                progressed = true;
            }
            if let Backing::Ring(r) = &mut self.disk {
                let done = r.reap();
                progressed |= !done.is_empty();
                let now = self.now();
                for c in done {
                    self.on_disk(now, c);
                }
                self.drain();
            }
            let now = self.now();
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
                self.drain();
                progressed = true;
            }
            self.report_changes();
            if self.stopped {
                break;
            }
            self.flush_sends();
            if progressed {
                if let Backing::Ring(r) = &mut self.disk {
                    r.flush_submissions();
                }
                continue;
            }
            let timeout = self
                .node
                .poll_timeout()
                .map(|t| Duration::from_millis(t.0.saturating_sub(self.now().0)));
            match &mut self.disk {
                Backing::Ring(r) => {
                    self.waker.sleeping.store(true, Ordering::SeqCst);
                    // Anything sent before `sleeping` was set is in the channel now.
                    match rx.try_recv() {
                        Ok(ev) => {
                            self.waker.sleeping.store(false, Ordering::SeqCst);
                            self.handle(ev);
                            continue;
                        }
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                        Err(std::sync::mpsc::TryRecvError::Empty) => {}
                    }
                    let done = r.wait(timeout);
                    self.waker.sleeping.store(false, Ordering::SeqCst);
                    let now = self.now();
                    for c in done {
                        self.on_disk(now, c);
                    }
                    self.drain();
                }
                Backing::Thread(_) => {
                    let ev = match timeout {
                        Some(t) => rx.recv_timeout(t),
                        None => rx
                            .recv()
                            .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
                    };
                    match ev {
                        Ok(ev) => self.handle(ev),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        self.close_peer();
        if let Some(dev) = self.loop_dev.take() {
            frontend::remove_link(&self.link);
            if let Err(e) = self.device.detach(&dev) {
                tracing::warn!(resource = %self.name, error = %e, "detach the device");
            }
        }
        if let Backing::Ring(r) = &mut self.disk {
            r.cancel_polls(FRONTEND_POLL_TAG);
            r.flush_submissions();
        }
        self.frontend.close();
        tracing::info!(resource = %self.name, "stopped");
        if let Some(r) = self.shutdown.take() {
            let _ = r.send(());
        }
    }

    fn handle(&mut self, ev: Event) {
        let now = self.now();
        match ev {
            Event::App(r) => self.on_app(now, r),
            Event::Disk(c) => self.on_disk(now, c),
            Event::Accepted {
                node,
                channel,
                stream,
            } => self.on_accepted(now, node, channel, stream),
            Event::Dialed { result } => {
                self.dialing = false;
                match result {
                    Ok((d, m)) if self.want_connect && self.conn.is_none() => {
                        self.establish(now, d, m)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.dial_failures += 1;
                        // Log the first failure of a run loudly, the retries quietly.
                        if self.dial_failures == 1 {
                            tracing::warn!(resource = %self.name, peer = %self.peer.peer_addr, error = %e, "cannot connect to peer; retrying");
                        } else {
                            tracing::debug!(resource = %self.name, error = %e, "connect retry failed");
                        }
                        self.backoff_ms =
                            (self.backoff_ms * 2).clamp(DIAL_BACKOFF_MIN_MS, DIAL_BACKOFF_MAX_MS);
                    }
                }
                self.maybe_dial();
            }
            Event::WitnessReply(r) => self.node.handle_witness_reply(now, r),
            Event::FencePeerDone(code) => self.node.handle_fence_peer_done(now, code),
            Event::ServiceDone { idx, result } => {
                self.service_task = None;
                if let Err(e) = &result {
                    tracing::error!(resource = %self.name, service = %self.services[idx].name(), error = %e, "service failed");
                }
                self.node.handle_service_done(now, idx, result.is_ok());
            }
            Event::PeerMsg {
                conn,
                term,
                msg,
                data,
            } => self.on_peer_frame(now, conn, net::Frame { msg, term, data }),
            Event::PeerDown { conn, reason, eof } => self.on_peer_down(now, conn, reason, eof),
            Event::SendReport {
                conn,
                channel,
                report,
            } => {
                let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) else {
                    return;
                };
                match report {
                    sendq::TaskReport::Drained { handoff } => c.out[channel].on_report(handoff),
                    sendq::TaskReport::Failed(reason) => {
                        self.close_peer();
                        self.node.handle_peer_disconnected(now, &reason);
                        self.maybe_dial();
                    }
                }
            }
            Event::PeerGrace { conn } => {
                if self.conn.as_ref().map(|c| c.id) == Some(conn) {
                    self.close_peer();
                    self.node
                        .handle_peer_disconnected(now, "peer closed one channel");
                    self.maybe_dial();
                }
            }
            Event::Admin { cmd, reply } => self.on_admin(now, cmd, reply),
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::DeviceChecked { busy } => self.node.handle_device_checked(now, busy),
            Event::DeviceAttached { dev, outcome } => {
                if let Some(d) = dev {
                    tracing::info!(resource = %self.name, device = %self.link.display(), loop_device = %d.display(), "device ready");
                    self.loop_dev = Some(d);
                }
                self.node.handle_device_attached(now, outcome);
            }
            Event::DeviceDetached(outcome) => {
                if outcome != DetachOutcome::InUse {
                    self.loop_dev = None;
                }
                self.node.handle_device_detached(now, outcome);
            }
            Event::Shutdown { reply, give_up_at } => {
                if self.node.resource().role() == Role::Primary
                    && self.loop_dev.as_ref().is_some_and(|d| frontend::in_use(d))
                {
                    tracing::warn!(resource = %self.name, "stopping while the device is in use; its users will see I/O errors");
                }
                let left_ms = give_up_at
                    .saturating_duration_since(std::time::Instant::now())
                    .as_millis() as u64;
                self.shutdown = Some(reply);
                self.node.handle_shutdown(now, now.plus_ms(left_ms));
            }
        }
        self.drain();
    }
}

fn errno(e: ReqError) -> i32 {
    match e {
        ReqError::ReadOnly => nix::libc::EROFS,
        ReqError::OutOfRange => nix::libc::ENOSPC,
        ReqError::Io => nix::libc::EIO,
        ReqError::TooLarge => nix::libc::EINVAL,
    }
}
