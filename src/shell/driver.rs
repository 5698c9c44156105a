//! The per-resource driver: one OS thread owns a core [`Resource`] and carries out its
//! actions against the backing disk, the peer connections and the frontend.
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

use crate::core::promoter::{OnDemoteFailure, Phase, Promoter, PromoterAction};
use crate::core::resource::{
    Action, AdminCmd, AdminReply, BufId, IoId, ReqError, ReqId, Resource, Role, StateKey,
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
    /// Whether the device is still held, checked off the driver thread before `cmd`
    /// (`busy`: why it cannot go).
    DeviceChecked {
        cmd: AdminCmd,
        reply: oneshot::Sender<Reply>,
        busy: Option<String>,
    },
    /// The loop device was attached (promote) or detached (demote).
    DeviceDone {
        attached: Option<Result<PathBuf, String>>,
        reply: Option<oneshot::Sender<Reply>>,
        message: String,
    },
    /// Stop: demote (services first), wait until nothing is in flight, then let the
    /// device go. At `give_up_at` the thread stops even with I/O still in flight (it
    /// fails), so the loop device and the FUSE mount never outlive the daemon.
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
    core: Resource,
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
    loop_dev: Option<PathBuf>,
    device_busy: bool,
    /// A demotion waits for [`device_busy_error`]'s answer.
    device_checking: bool,
    shutdown: Option<oneshot::Sender<()>>,
    /// When a stop gives up waiting for I/O in flight (from [`Event::Shutdown`]).
    stop_by: Option<std::time::Instant>,
    witness_tx: Option<mpsc::UnboundedSender<(witness::Request, u64)>>,
    /// The reply of the admin command being handled, for the device steps it causes.
    admin_reply: Option<oneshot::Sender<Reply>>,
    /// A promotion waiting for the witness.
    /// The answer to an admin command the core finishes later ([`Action::AdminDone`]),
    /// with the message for success.
    promote_reply: Option<(oneshot::Sender<Reply>, &'static str)>,
    promoter: Promoter,
    services: Arc<Vec<Service>>,
    /// The start or stop running for the promoter; aborted when it runs too long.
    service_task: Option<tokio::task::AbortHandle>,
    /// A demotion or switchover waiting for the services to stop.
    after_services: Option<(AdminCmd, oneshot::Sender<Reply>)>,
    /// A switchover waiting for the peer to take over, and when it was asked for.
    switchover: Option<(oneshot::Sender<Reply>, std::time::Instant, u64)>,
    switchover_asked: Option<std::time::Instant>,
    shutdown_after_services: Option<oneshot::Sender<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{path}: cannot open backing disk: {err}")]
    Disk { path: String, err: std::io::Error },
    #[error("{0}")]
    Frontend(#[from] frontend::FrontendError),
}

/// Open the disk, mount the frontend and start the resource's thread. Call from within
/// the tokio runtime that is to carry the network tasks.
pub fn start(s: Setup) -> Result<Handle, StartError> {
    let (raw_tx, rx) = std::sync::mpsc::channel();
    let disk_name = s.disk_path.display().to_string();
    let disk_err = |err: std::io::Error| StartError::Disk {
        path: disk_name.clone(),
        err,
    };
    let efd = nix::sys::eventfd::EventFd::from_value_and_flags(
        0,
        nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
    )
    .map_err(|e| disk_err(std::io::Error::from(e)))?;
    let waker = Arc::new(Waker {
        efd: OwnedFd::from(efd),
        sleeping: AtomicBool::new(false),
    });
    let tx = EventTx {
        tx: raw_tx,
        waker: waker.clone(),
    };
    let (events, _) = broadcast::channel(1024);
    let name = s.core.status().name;
    let ring = if s.want_uring {
        match Ring::open(&s.disk_path) {
            Ok(mut r) => {
                r.watch_eventfd(waker.efd.as_raw_fd());
                Some(r)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ResourceBusy
                ) =>
            {
                return Err(disk_err(e))
            }
            Err(e) => {
                tracing::warn!(resource = %name, error = %e, "io_uring not available; using pread/pwrite");
                None
            }
        }
    } else {
        None
    };
    let mut disk = match ring {
        Some(r) => {
            tracing::info!(resource = %name, backend = "io_uring", direct = r.direct, "backing disk open");
            Backing::Ring(Box::new(r))
        }
        None => {
            let dtx = tx.clone();
            let d = Disk::open(
                &s.disk_path,
                Box::new(move |c| {
                    let _ = dtx.send(Event::Disk(c));
                }),
            )
            .map_err(disk_err)?;
            tracing::info!(resource = %name, backend = "pread/pwrite", direct = d.direct, "backing disk open");
            Backing::Thread(d)
        }
    };
    let mut frontend: Box<dyn Frontend> =
        Box::new(FuseLoop::mount(&s.mountpoint, s.core.data_bytes())?);
    match (&mut disk, frontend.poll_fd()) {
        (Backing::Ring(r), Some(fd)) => r.poll_readable(FRONTEND_POLL_TAG, fd),
        _ => {
            let ftx = tx.clone();
            frontend.spawn_reader(Arc::new(move |r| {
                let _ = ftx.send(Event::App(r));
            }))?
        }
    }
    tracing::info!(resource = %name, frontend = frontend.name(), "frontend ready");
    let device = frontend.device();
    frontend::remove_link(&s.link);
    let dialer = s.peer.local_node < s.peer.peer_node;
    let witness_tx = s.peer.witness_addr.map(|addr| {
        let (wtx, wrx) = mpsc::unbounded_channel();
        let etx = tx.clone();
        tokio::spawn(witness_task(
            addr,
            s.peer.secret.clone(),
            s.peer.local_node.clone(),
            wrx,
            etx,
        ));
        wtx
    });
    let d = Driver {
        name: name.clone(),
        core: s.core,
        disk,
        disk_path: s.disk_path,
        start: std::time::Instant::now(),
        rt: tokio::runtime::Handle::current(),
        tx: tx.clone(),
        waker,
        events: events.clone(),
        last_key: None,
        bufs: HashMap::new(),
        ios: HashMap::new(),
        next_req: 1,
        next_rx_buf: 1,
        next_read: 1,
        writes: HashMap::new(),
        writes_done: 0,
        write_latency_us_sum: 0,
        flushes: HashMap::new(),
        reads: HashMap::new(),
        peer: s.peer,
        dialer,
        want_connect: false,
        conn: None,
        next_conn: 1,
        dialing: false,
        backoff_ms: 0,
        dial_failures: 0,
        pending_data: None,
        frontend,
        device,
        frontend_reqs: Vec::new(),
        link: s.link,
        loop_dev: None,
        device_busy: false,
        device_checking: false,
        shutdown: None,
        stop_by: None,
        witness_tx,
        admin_reply: None,
        promote_reply: None,
        promoter: Promoter::new(
            s.services.iter().map(Service::spec).collect(),
            s.on_demote_failure,
        ),
        services: Arc::new(s.services),
        service_task: None,
        after_services: None,
        switchover: None,
        switchover_asked: None,
        shutdown_after_services: None,
    };
    std::thread::Builder::new()
        .name(format!("tandem-{name}"))
        .spawn(move || d.run(rx))
        .map_err(disk_err)?;
    Ok(Handle { name, tx, events })
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
            if self.core.poll_timeout().is_some_and(|t| t <= now) {
                self.core.handle_timeout(now);
                self.drain();
                progressed = true;
            }
            if self.promoter.poll_timeout().is_some_and(|t| t <= now) {
                if let Some(t) = self.service_task.take() {
                    t.abort();
                }
                self.promoter.handle_timeout(now);
                self.drain_promoter();
                progressed = true;
            }
            self.report_changes();
            if self.shutdown.is_some() {
                if self.core.is_idle() {
                    break;
                }
                if self.stop_by.is_some_and(|t| std::time::Instant::now() >= t) {
                    tracing::error!(resource = %self.name, "stopping with I/O still in flight: it fails; the next start resyncs what it touched");
                    break;
                }
            }
            self.flush_sends();
            if progressed {
                if let Backing::Ring(r) = &mut self.disk {
                    r.flush_submissions();
                }
                continue;
            }
            let stop_in = self
                .stop_by
                .map(|t| t.saturating_duration_since(std::time::Instant::now()));
            let timeout = [self.core.poll_timeout(), self.promoter.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .map(|t| Duration::from_millis(t.0.saturating_sub(self.now().0)))
                .into_iter()
                .chain(stop_in)
                .min();
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
            Event::WitnessReply(r) => self.core.handle_witness_reply(now, r),
            Event::FencePeerDone(code) => self.core.handle_fence_peer_done(now, code),
            Event::ServiceDone { idx, result } => {
                self.service_task = None;
                if let Err(e) = &result {
                    tracing::error!(resource = %self.name, service = %self.services[idx].name(), error = %e, "service failed");
                }
                self.promoter.handle_done(now, idx, result.is_ok());
                if self.promoter.phase() == Phase::Running {
                    self.core.handle_services(true);
                }
                self.drain_promoter();
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
                        self.core.handle_peer_disconnected(now, &reason);
                        self.maybe_dial();
                    }
                }
            }
            Event::PeerGrace { conn } => {
                if self.conn.as_ref().map(|c| c.id) == Some(conn) {
                    self.close_peer();
                    self.core
                        .handle_peer_disconnected(now, "peer closed one channel");
                    self.maybe_dial();
                }
            }
            Event::Admin { cmd, reply } => self.on_admin(now, cmd, reply),
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::DeviceChecked { cmd, reply, busy } => {
                self.device_checking = false;
                match busy {
                    Some(e) => {
                        if cmd == AdminCmd::Switchover {
                            self.switchover_asked = None;
                        }
                        let _ = reply.send(Reply::err(e));
                    }
                    None => self.device_free(now, cmd, reply),
                }
            }
            Event::DeviceDone {
                attached,
                reply,
                message,
            } => {
                self.device_busy = false;
                let mut out = Reply::ok(message);
                match attached {
                    Some(Ok(dev)) => match frontend::make_link(&self.link, &dev) {
                        Ok(()) => {
                            tracing::info!(resource = %self.name, device = %self.link.display(), loop_device = %dev.display(), "device ready");
                            self.loop_dev = Some(dev);
                            if self.core.role() == Role::Primary {
                                self.promoter.handle_promoted(now);
                                self.drain_promoter();
                            }
                        }
                        Err(e) => {
                            tracing::error!(resource = %self.name, error = %e, "device link");
                            self.loop_dev = Some(dev);
                            out = Reply::err(format!("promoted, but {e}"));
                        }
                    },
                    Some(Err(e)) => {
                        tracing::error!(resource = %self.name, error = %e, "attach loop device");
                        out = Reply::err(format!(
                            "promoted, but the device could not be attached: {e}"
                        ));
                    }
                    None => {}
                }
                if let Some(r) = reply {
                    let _ = r.send(out);
                }
            }
            Event::Shutdown { reply, give_up_at }
                if matches!(
                    self.promoter.phase(),
                    Phase::Starting | Phase::Running | Phase::Stopping
                ) =>
            {
                // Services first, then the demotion below.
                self.stop_by = Some(give_up_at);
                self.shutdown_after_services = Some(reply);
                self.promoter.handle_stop(now);
                self.drain_promoter();
            }
            Event::Shutdown { reply, give_up_at } => {
                self.stop_by = Some(self.stop_by.map_or(give_up_at, |t| t.min(give_up_at)));
                if self.core.role() == Role::Primary {
                    if self.loop_dev.as_ref().is_some_and(|d| frontend::in_use(d)) {
                        tracing::warn!(resource = %self.name, "stopping while the device is in use; its users will see I/O errors");
                    }
                    self.frontend.set_writable(false);
                    if let Err(e) = self.core.handle_admin(now, AdminCmd::Demote) {
                        tracing::warn!(resource = %self.name, error = %e, "demote on shutdown; the next start resyncs the activity log");
                    }
                }
                self.shutdown = Some(reply);
            }
        }
        self.drain();
    }

    fn on_app(&mut self, now: Instant, r: AppRequest) {
        match r {
            AppRequest::Write { offset, data, done } => {
                let req = self.next_req;
                self.next_req += 1;
                let len = data.len() as u64;
                self.bufs.insert(req, Arc::new(data));
                self.writes.insert(req, (done, std::time::Instant::now()));
                self.core.handle_app_write(now, ReqId(req), offset, len);
            }
            AppRequest::Flush { done } => {
                let req = self.next_req;
                self.next_req += 1;
                self.flushes.insert(req, done);
                self.core.handle_app_flush(now, ReqId(req));
            }
            AppRequest::Read { offset, len, done } => {
                let size = self.core.data_bytes();
                if offset >= size || len == 0 {
                    return done(Ok(&[]));
                }
                let end = (offset + len as u64).min(size);
                // O_DIRECT wants aligned reads: read the covering sectors, answer a slice.
                let a_off = offset / SECTOR_BYTES * SECTOR_BYTES;
                let a_end = end.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
                let tag = APP_READ_BIT | self.next_read;
                self.next_read += 1;
                self.reads.insert(
                    tag,
                    PendingRead {
                        skip: (offset - a_off) as usize,
                        len: (end - offset) as usize,
                        done,
                    },
                );
                self.submit(
                    tag,
                    DiskOp::Read {
                        offset: a_off,
                        len: (a_end - a_off) as usize,
                    },
                );
            }
        }
    }

    fn on_peer_frame(&mut self, now: Instant, conn: u64, f: net::Frame) {
        if self.conn.as_ref().map(|c| c.id) != Some(conn) {
            return;
        }
        let buf = f.data.map(|d| {
            let id = RX_BUF_BIT | self.next_rx_buf;
            self.next_rx_buf += 1;
            self.bufs.insert(id, Arc::new(d));
            BufId(id)
        });
        self.core.handle_peer_message(now, f.term, f.msg, buf);
    }

    fn on_peer_down(&mut self, now: Instant, conn: u64, reason: String, eof: bool) {
        let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) else {
            return;
        };
        if eof && !c.half_closed {
            // A peer that closes sends everything first, on both channels; the two
            // channels are read independently, so wait for the other channel's end (or a
            // short grace) before telling the core.
            c.half_closed = true;
            let tx = self.tx.clone();
            self.rt.spawn(async move {
                tokio::time::sleep(HALF_CLOSE_GRACE).await;
                let _ = tx.send(Event::PeerGrace { conn });
            });
            return;
        }
        self.close_peer();
        self.core.handle_peer_disconnected(now, &reason);
        self.maybe_dial();
    }

    /// The ring says a peer socket is readable: take every frame it has.
    fn on_peer_readable(&mut self, now: Instant, tag: u64) {
        let (conn, ch) = ((tag & !NET_POLL_BIT) >> 1, (tag & 1) as usize);
        let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) else {
            return;
        };
        let Some(rx) = c.rx[ch].as_mut() else {
            return;
        };
        let fd = rx.sock.as_raw_fd();
        let mut frames = Vec::new();
        let r = rx
            .reader
            .read_available(&mut rx.sock, &mut frames, RX_BUDGET_BYTES);
        if !matches!(r, Ok(net::ReadState::WouldBlock | net::ReadState::Budget)) {
            c.rx[ch] = None;
        }
        for f in frames {
            self.on_peer_frame(now, conn, f);
        }
        match r {
            Ok(net::ReadState::WouldBlock | net::ReadState::Budget) => {
                // Handling a frame may have closed the connection (and so this socket).
                let open = self
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.id == conn && c.rx[ch].is_some());
                if let (true, Backing::Ring(r)) = (open, &mut self.disk) {
                    r.poll_readable(tag, fd);
                }
            }
            Ok(net::ReadState::Eof) => {
                self.on_peer_down(now, conn, "closed by peer".to_string(), true)
            }
            Err(e) => self.on_peer_down(now, conn, e.to_string(), false),
        }
    }

    /// The ring says the frontend is readable: take the waiting requests.
    fn on_frontend_readable(&mut self, now: Instant) {
        let mut reqs = std::mem::take(&mut self.frontend_reqs);
        let state = self
            .frontend
            .read_requests(FRONTEND_BUDGET_REQUESTS, &mut reqs);
        for r in reqs.drain(..) {
            self.on_app(now, r);
        }
        self.frontend_reqs = reqs;
        match (state, &mut self.disk, self.frontend.poll_fd()) {
            (RequestState::Gone, _, _) => {
                tracing::info!(resource = %self.name, frontend = self.frontend.name(), "the frontend closed");
            }
            (_, Backing::Ring(r), Some(fd)) => r.poll_readable(FRONTEND_POLL_TAG, fd),
            _ => {}
        }
    }

    fn on_disk(&mut self, now: Instant, c: Completion) {
        if c.tag == FRONTEND_POLL_TAG {
            return self.on_frontend_readable(now);
        }
        if c.tag & NET_POLL_BIT != 0 {
            return self.on_peer_readable(now, c.tag);
        }
        if c.tag & APP_READ_BIT != 0 {
            let Some(p) = self.reads.remove(&c.tag) else {
                return;
            };
            match c.result {
                Ok(Some(b)) => (p.done)(Ok(&b.as_slice()[p.skip..p.skip + p.len])),
                Ok(None) => (p.done)(Err(nix::libc::EIO)),
                Err(e) => {
                    tracing::error!(resource = %self.name, error = %e, "read from backing disk failed");
                    (p.done)(Err(nix::libc::EIO))
                }
            }
            return;
        }
        let Some(kind) = self.ios.remove(&c.tag) else {
            tracing::error!(resource = %self.name, tag = c.tag, "completion of an unknown disk request");
            return;
        };
        if let Err(e) = &c.result {
            tracing::error!(resource = %self.name, disk = %self.disk_path.display(), error = %e, "backing disk request failed");
        }
        let ok = c.result.is_ok();
        match kind {
            IoKind::Write | IoKind::Flush => self.core.handle_disk_done(now, IoId(c.tag), ok),
            IoKind::Read { buf } => {
                if let Ok(Some(b)) = c.result {
                    self.bufs.insert(buf.0, Arc::new(b));
                }
                self.core.handle_disk_done(now, IoId(c.tag), ok);
            }
            IoKind::Meta if ok => {
                let tag = c.tag | META_SYNC_BIT;
                self.ios.insert(tag, IoKind::MetaSync { io: IoId(c.tag) });
                self.submit(tag, DiskOp::Flush);
            }
            IoKind::Meta => self.core.handle_disk_done(now, IoId(c.tag), false),
            IoKind::MetaSync { io } => self.core.handle_disk_done(now, io, ok),
        }
    }

    fn on_admin(&mut self, now: Instant, cmd: AdminCmd, reply: oneshot::Sender<Reply>) {
        let demoting = matches!(cmd, AdminCmd::Demote | AdminCmd::Switchover);
        if cmd == AdminCmd::Switchover && self.switchover_asked.is_none() {
            if let Err(e) = self.core.switchover_precheck() {
                let _ = reply.send(Reply::err(e.to_string()));
                return;
            }
            self.switchover_asked = Some(std::time::Instant::now());
        }
        if demoting && self.promoter.phase() != Phase::Idle {
            if self.after_services.is_some() || self.shutdown_after_services.is_some() {
                let _ = reply.send(Reply::err("services are already being stopped"));
                return;
            }
            // Stop the services in reverse; the demotion follows when they are down.
            self.after_services = Some((cmd, reply));
            self.promoter.handle_stop(now);
            self.drain_promoter();
            return;
        }
        if self.device_checking {
            let _ = reply.send(Reply::err("a role change is still in progress; try again"));
            return;
        }
        if cmd == AdminCmd::Switchover {
            return self.check_device_then(now, cmd, reply);
        }
        if self.device_busy {
            let _ = reply.send(Reply::err("a role change is still in progress; try again"));
            return;
        }
        if cmd == AdminCmd::Demote && self.core.role() == Role::Primary {
            return self.check_device_then(now, cmd, reply);
        }
        self.run_admin(now, cmd, reply);
    }

    /// Before a demotion or switchover: whether something outside the services (stopped
    /// by then) still has the device mounted or open. A holder that is just letting go
    /// (a file system unmounted a moment ago) may need this thread to serve its last
    /// I/O, so the check, which allows it time to settle, runs on a thread of its own
    /// and `cmd` goes on when its answer comes back.
    fn check_device_then(&mut self, now: Instant, cmd: AdminCmd, reply: oneshot::Sender<Reply>) {
        let Some(dev) = self.loop_dev.clone() else {
            return self.device_free(now, cmd, reply);
        };
        self.device_checking = true;
        let link = self.link.clone();
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let busy = device_busy_error(&link, &dev);
            let _ = tx.send(Event::DeviceChecked { cmd, reply, busy });
        });
    }

    /// The device may go: on with the demotion or switchover.
    fn device_free(&mut self, now: Instant, cmd: AdminCmd, reply: oneshot::Sender<Reply>) {
        match cmd {
            AdminCmd::Switchover => self.switchover(now, reply),
            _ => self.run_admin(now, cmd, reply),
        }
    }

    /// An admin command the device allows now.
    fn run_admin(&mut self, now: Instant, cmd: AdminCmd, reply: oneshot::Sender<Reply>) {
        let msg = match &cmd {
            AdminCmd::Promote { .. } => "already primary",
            AdminCmd::Demote => "already secondary",
            AdminCmd::Connect { discard_my_data } if *discard_my_data => {
                "connecting; this node's changes will be discarded"
            }
            AdminCmd::Connect { .. } => "connecting",
            AdminCmd::Disconnect => "disconnected",
            AdminCmd::Invalidate => "invalidated: full resync from the peer",
            AdminCmd::Switchover => "switched over",
            AdminCmd::AdoptWitness { .. } => "the witness adopted this pair's term",
        };
        self.admin_reply = Some(reply);
        let cmd_kind = cmd.clone();
        let out = self.core.handle_admin(now, cmd);
        // A role change among the actions takes `admin_reply` for its device steps.
        self.drain();
        let reply = self.admin_reply.take();
        match out {
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::err(e.to_string()));
                }
            }
            Ok(AdminReply::Pending) => {
                if let Some(r) = reply {
                    let ok = match cmd_kind {
                        AdminCmd::AdoptWitness { .. } => msg,
                        _ => "primary",
                    };
                    self.promote_reply = Some((r, ok));
                }
            }
            Ok(AdminReply::Done) => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok(msg));
                }
            }
        }
    }

    /// The core changed role (an admin command, the witness, or a newer primary): attach
    /// or detach the device, answering the admin command that caused it, if any.
    fn on_role_changed(&mut self, role: Role) {
        tracing::info!(resource = %self.name, ?role, "role changed");
        let reply = self
            .admin_reply
            .take()
            .or_else(|| self.promote_reply.take().map(|(r, _)| r));
        if self.shutdown.is_some() {
            // Stopping: the run loop detaches the device itself once the core is idle.
            return;
        }
        if role == Role::Primary {
            self.frontend.set_writable(true);
            if self.loop_dev.is_some() {
                // Still attached from a step-down whose device was in use.
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok(format!(
                        "primary; device {}",
                        self.link.display()
                    )));
                }
                return;
            }
            self.device_busy = true;
            let device = self.device.clone();
            let tx = self.tx.clone();
            let link = self.link.clone();
            std::thread::spawn(move || {
                let attached = device.attach().map_err(|e| e.to_string());
                let message = format!("primary; device {}", link.display());
                let _ = tx.send(Event::DeviceDone {
                    attached: Some(attached),
                    reply,
                    message,
                });
            });
            return;
        }
        self.frontend.set_writable(false);
        if self.promoter.phase() != Phase::Idle {
            // Stepped down (a newer term): stop the services, then let the device go.
            if let Some(r) = reply {
                let _ = r.send(Reply::ok("secondary; stopping the services"));
            }
            let now = self.now();
            self.promoter.handle_stop(now);
            self.drain_promoter();
            return;
        }
        if let Some(dev) = &self.loop_dev {
            if frontend::in_use(dev) {
                // A step-down forced by a newer primary: the users see I/O errors; the
                // device goes once they let go and the node is demoted or promoted again.
                tracing::error!(resource = %self.name, device = %dev.display(), "stepped down while the device is in use: its users get I/O errors; unmount it");
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok("secondary; the device is still in use"));
                }
                return;
            }
        }
        frontend::remove_link(&self.link);
        match self.loop_dev.take() {
            Some(dev) => {
                self.device_busy = true;
                let tx = self.tx.clone();
                let device = self.device.clone();
                std::thread::spawn(move || {
                    let message = match device.detach(&dev) {
                        Ok(()) => "secondary".to_string(),
                        Err(e) => format!("secondary; detaching {}: {e}", dev.display()),
                    };
                    let _ = tx.send(Event::DeviceDone {
                        attached: None,
                        reply,
                        message,
                    });
                });
            }
            None => {
                if let Some(r) = reply {
                    let _ = r.send(Reply::ok("secondary"));
                }
            }
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.core.poll_action() {
            self.act(a);
        }
    }

    /// The services are down and the device free: demote and hand over to the peer.
    fn switchover(&mut self, now: Instant, reply: oneshot::Sender<Reply>) {
        let asked = self
            .switchover_asked
            .take()
            .unwrap_or_else(std::time::Instant::now);
        match self.core.handle_admin(now, AdminCmd::Switchover) {
            Err(e) => {
                let _ = reply.send(Reply::err(e.to_string()));
            }
            Ok(_) => {
                self.switchover = Some((reply, asked, asked.elapsed().as_millis() as u64));
            }
        }
        self.drain();
    }

    fn drain_promoter(&mut self) {
        while let Some(a) = self.promoter.poll_action() {
            self.act_promoter(a);
        }
    }

    fn act_promoter(&mut self, a: PromoterAction) {
        let now = self.now();
        match a {
            PromoterAction::Start { idx } | PromoterAction::Stop { idx } => {
                let start = matches!(a, PromoterAction::Start { .. });
                let services = self.services.clone();
                let ctx = services::Context {
                    resource: self.name.clone(),
                    node: self.peer.local_node.clone(),
                    device: self.link.clone(),
                };
                tracing::info!(resource = %self.name, service = %services[idx].name(), "{} service", if start { "starting" } else { "stopping" });
                let tx = self.tx.clone();
                let task = self.rt.spawn(async move {
                    let svc = &services[idx];
                    let result = if start {
                        svc.start(&ctx).await
                    } else {
                        svc.stop(&ctx).await
                    };
                    let _ = tx.send(Event::ServiceDone { idx, result });
                });
                self.service_task = Some(task.abort_handle());
            }
            PromoterAction::Demote { after_failure } => {
                if after_failure {
                    tracing::error!(resource = %self.name, failure = self.promoter.last_failure().unwrap_or(""), "a service failed to start: demoting so that the peer may take over");
                    self.core.handle_services(false);
                }
                if let Some(r) = self.shutdown_after_services.take() {
                    let give_up_at = self.stop_by.unwrap_or_else(std::time::Instant::now);
                    self.handle(Event::Shutdown {
                        reply: r,
                        give_up_at,
                    });
                    return;
                }
                match self.after_services.take() {
                    Some((cmd, reply)) if self.core.role() == Role::Primary => {
                        self.on_admin(now, cmd, reply)
                    }
                    Some((_, reply)) => {
                        // Already secondary (a step-down): now the device can go.
                        self.on_role_changed(Role::Secondary);
                        let _ = reply.send(Reply::err(
                            "this node was made secondary meanwhile (a newer term)",
                        ));
                    }
                    None if self.core.role() == Role::Primary => {
                        let (tx, _) = oneshot::channel();
                        self.on_admin(now, AdminCmd::Demote, tx);
                    }
                    None => self.on_role_changed(Role::Secondary),
                }
            }
            PromoterAction::Escalate(policy) => {
                let failure = self.promoter.last_failure().unwrap_or("").to_string();
                if let Some((_, r)) = self.after_services.take() {
                    let _ = r.send(Reply::err(format!("not demoted: {failure}")));
                }
                self.switchover_asked = None;
                tracing::error!(resource = %self.name, %failure, ?policy, "a service did not stop");
                match policy {
                    OnDemoteFailure::None => {}
                    OnDemoteFailure::Exit => std::process::exit(1),
                    OnDemoteFailure::Reboot | OnDemoteFailure::Poweroff => {
                        let cmd = if policy == OnDemoteFailure::Reboot {
                            "reboot"
                        } else {
                            "poweroff"
                        };
                        if let Err(e) = std::process::Command::new(cmd).arg("-f").status() {
                            tracing::error!(resource = %self.name, error = %e, "{cmd} -f");
                        }
                    }
                }
                if let Some(r) = self.shutdown_after_services.take() {
                    let give_up_at = self.stop_by.unwrap_or_else(std::time::Instant::now);
                    self.handle(Event::Shutdown {
                        reply: r,
                        give_up_at,
                    });
                }
            }
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::DiskWrite { io, offset, buf } => match self.bufs.get(&buf.0) {
                Some(b) => {
                    let op = DiskOp::Write {
                        offset,
                        buf: b.clone(),
                    };
                    self.ios.insert(io.0, IoKind::Write);
                    self.submit(io.0, op);
                }
                None => {
                    tracing::error!(resource = %self.name, buf = buf.0, "core wrote a buffer the driver does not hold");
                    let now = self.now();
                    self.core.handle_disk_done(now, io, false);
                }
            },
            Action::DiskRead {
                io,
                offset,
                len,
                buf,
            } => {
                self.ios.insert(io.0, IoKind::Read { buf });
                self.submit(
                    io.0,
                    DiskOp::Read {
                        offset,
                        len: len as usize,
                    },
                );
            }
            Action::DiskFlush { io } => {
                self.ios.insert(io.0, IoKind::Flush);
                self.submit(io.0, DiskOp::Flush);
            }
            Action::MetaWrite { io, offset, bytes } => {
                self.ios.insert(io.0, IoKind::Meta);
                self.submit(
                    io.0,
                    DiskOp::Write {
                        offset,
                        buf: Arc::new(AlignedBuf::from_slice(&bytes)),
                    },
                );
            }
            Action::Send { msg, buf, term } => {
                let Some(c) = &mut self.conn else { return };
                let data = match buf {
                    Some(b) => match self.bufs.get(&b.0) {
                        Some(d) => Some(d.clone()),
                        None => {
                            tracing::error!(resource = %self.name, buf = b.0, "core sent a buffer the driver does not hold");
                            return;
                        }
                    },
                    None => None,
                };
                let empty: &[u8] = &[];
                let head = msg.encode(term, data.as_ref().map_or(empty, |d| d.as_slice()));
                let ch = match msg.channel() {
                    Channel::Data => 0,
                    Channel::Meta => 1,
                };
                c.out[ch].push(head, data);
            }
            Action::ReleaseBuf(b) => {
                self.bufs.remove(&b.0);
            }
            Action::CompleteWrite { req, result } => {
                if let Some((done, since)) = self.writes.remove(&req.0) {
                    done(result.map_err(errno));
                    self.writes_done += 1;
                    self.write_latency_us_sum += since.elapsed().as_micros() as u64;
                }
            }
            Action::CompleteFlush { req, result } => {
                if let Some(done) = self.flushes.remove(&req.0) {
                    done(result.map_err(errno));
                }
            }
            Action::Disconnect { reason } => {
                tracing::info!(resource = %self.name, %reason, "closing peer connection");
                self.close_peer();
                self.maybe_dial();
            }
            Action::SetConnect(on) => {
                self.want_connect = on;
                if on {
                    self.dial_failures = 0;
                    self.maybe_dial();
                } else {
                    self.close_peer();
                    self.pending_data = None;
                }
            }
            Action::RoleChanged(role) => self.on_role_changed(role),
            Action::FailBack => {
                let busy = self.after_services.is_some()
                    || self.switchover.is_some()
                    || !matches!(self.promoter.phase(), Phase::Running | Phase::Idle);
                if !busy {
                    let (tx, rx) = oneshot::channel::<Reply>();
                    let name = self.name.clone();
                    self.rt.spawn(async move {
                        if let Ok(r) = rx.await {
                            match r.error {
                                None => tracing::info!(resource = %name, message = r.message.unwrap_or_default(), "fail-back done"),
                                Some(e) => tracing::error!(resource = %name, error = %e, "fail-back failed"),
                            }
                        }
                    });
                    let now = self.now();
                    self.on_admin(now, AdminCmd::Switchover, tx);
                }
            }
            Action::AdminDone(result) if self.switchover.is_some() => {
                if let Some((r, asked, demoted_ms)) = self.switchover.take() {
                    let _ = r.send(match result {
                        Ok(()) => Reply::ok(format!(
                            "switched over: {} is primary {} ms after the request (this node demoted after {demoted_ms} ms; its services start now)",
                            self.peer.peer_node,
                            asked.elapsed().as_millis()
                        )),
                        Err(e) => Reply::err(e.to_string()),
                    });
                }
            }
            Action::AdminDone(result) => {
                if let Some((r, ok)) = self.promote_reply.take() {
                    let _ = r.send(match result {
                        Ok(()) => Reply::ok(ok),
                        Err(e) => Reply::err(e.to_string()),
                    });
                }
            }
            Action::FencePeer { timeout_ms } => match self.peer.fence_peer.clone() {
                Some(cmd) => {
                    let env = FencePeerEnv {
                        resource: self.name.clone(),
                        node: self.peer.local_node.clone(),
                        peer: self.peer.peer_node.clone(),
                        peer_address: self.peer.peer_addr.to_string(),
                    };
                    let tx = self.tx.clone();
                    self.rt.spawn(async move {
                        let code = run_fence_peer(&cmd, &env, timeout_ms).await;
                        let _ = tx.send(Event::FencePeerDone(code));
                    });
                }
                None => {
                    let now = self.now();
                    self.core.handle_fence_peer_done(now, None);
                }
            },
            Action::Witness { req, timeout_ms } => match &self.witness_tx {
                Some(w) if w.send((req, timeout_ms)).is_ok() => {}
                _ => {
                    let now = self.now();
                    self.core.handle_witness_reply(now, None);
                }
            },
        }
    }

    fn maybe_dial(&mut self) {
        if !self.dialer || !self.want_connect || self.conn.is_some() || self.dialing {
            return;
        }
        self.dialing = true;
        let tx = self.tx.clone();
        let addr = self.peer.peer_addr;
        let secret = self.peer.secret.clone();
        let delay = Duration::from_millis(self.backoff_ms);
        let attach = |channel| Attached {
            resource: self.name.clone(),
            node: self.peer.local_node.clone(),
            channel,
        };
        let (a_data, a_meta) = (attach(0), attach(1));
        self.rt.spawn(async move {
            tokio::time::sleep(delay).await;
            let result = async {
                let d = net::connect(addr, &secret, &a_data).await?;
                let m = net::connect(addr, &secret, &a_meta).await?;
                Ok::<_, net::NetError>((d, m))
            }
            .await
            .map_err(|e| e.to_string());
            let _ = tx.send(Event::Dialed { result });
        });
    }

    fn on_accepted(&mut self, now: Instant, node: String, channel: u8, stream: TcpStream) {
        if node != self.peer.peer_node {
            tracing::warn!(resource = %self.name, %node, expected = %self.peer.peer_node, "connection from a node that is not this resource's peer refused");
            return;
        }
        if self.dialer {
            tracing::warn!(resource = %self.name, %node, "peer dialed, but this node dials; refused");
            return;
        }
        if !self.want_connect {
            tracing::info!(resource = %self.name, "peer connection refused: disconnected by the operator");
            return;
        }
        match channel {
            0 => {
                if self.conn.is_some() {
                    // The peer started over (restart, or it saw the link die first).
                    self.close_peer();
                    self.core
                        .handle_peer_disconnected(now, "peer opened a new connection");
                    // Carry out the old connection's actions before the new one is
                    // parked: none of them may touch the new stream.
                    self.drain();
                }
                self.pending_data = Some(stream);
            }
            1 => match self.pending_data.take() {
                Some(d) if self.conn.is_none() => self.establish(now, d, stream),
                _ => {
                    tracing::debug!(resource = %self.name, "meta connection without its data connection dropped")
                }
            },
            c => tracing::warn!(resource = %self.name, channel = c, "unknown channel refused"),
        }
    }

    fn establish(&mut self, now: Instant, data: TcpStream, meta: TcpStream) {
        let id = self.next_conn;
        self.next_conn += 1;
        self.backoff_ms = 0;
        self.dial_failures = 0;
        let mut readers = Vec::new();
        let mut outs = Vec::new();
        let mut rx: [Option<RxChannel>; 2] = [None, None];
        for (ch, s) in [data, meta].into_iter().enumerate() {
            // A second descriptor of the socket for the driver's own non-blocking writes
            // (and, with a ring, reads).
            let direct = match s.as_fd().try_clone_to_owned() {
                Ok(fd) => std::net::TcpStream::from(fd),
                Err(e) => {
                    tracing::error!(resource = %self.name, error = %e, "dup socket");
                    return;
                }
            };
            let (r, w) = s.into_split();
            if let Backing::Ring(ring) = &mut self.disk {
                // The driver reads this socket itself when its ring says it is readable:
                // a frame reaches the core without a hand-off from a reader task.
                let sock = match direct.try_clone() {
                    Ok(sock) => sock,
                    Err(e) => {
                        tracing::error!(resource = %self.name, error = %e, "dup socket for reading");
                        return;
                    }
                };
                ring.poll_readable(net_poll_tag(id, ch), sock.as_raw_fd());
                rx[ch] = Some(RxChannel {
                    sock,
                    reader: net::FrameReader::default(),
                });
            } else {
                let tx = self.tx.clone();
                readers.push(self.rt.spawn(async move {
                    let mut r = BufReader::with_capacity(64 << 10, r);
                    loop {
                        match net::read_frame(&mut r).await {
                            Ok(net::Frame { msg, term, data }) => {
                                if !tx.send(Event::PeerMsg {
                                    conn: id,
                                    term,
                                    msg,
                                    data,
                                }) {
                                    return;
                                }
                            }
                            Err(e) => {
                                let eof = matches!(&e, net::NetError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
                                let _ = tx.send(Event::PeerDown {
                                    conn: id,
                                    reason: if eof {
                                        "closed by peer".to_string()
                                    } else {
                                        e.to_string()
                                    },
                                    eof,
                                });
                                return;
                            }
                        }
                    }
                }));
            }
            let (wtx, wrx) = mpsc::unbounded_channel();
            let tx = self.tx.clone();
            self.rt.spawn(sendq::backlog_task(w, wrx, move |report| {
                let _ = tx.send(Event::SendReport {
                    conn: id,
                    channel: ch,
                    report,
                });
            }));
            outs.push(SendQueue::new(direct, wtx));
        }
        let Ok(out) = <[SendQueue; 2]>::try_from(outs) else {
            return;
        };
        tracing::info!(resource = %self.name, peer = %self.peer.peer_node, conn = id, "peer connected");
        self.conn = Some(PeerConn {
            id,
            out,
            readers,
            rx,
            half_closed: false,
        });
        self.core.handle_peer_connected(now);
    }

    /// Forget the connection: queued frames still go out, then the sockets close.
    fn close_peer(&mut self) {
        if let Some(mut c) = self.conn.take() {
            for o in &mut c.out {
                o.close();
            }
            for r in c.readers {
                r.abort();
            }
            if let Backing::Ring(r) = &mut self.disk {
                for ch in 0..2 {
                    r.cancel_polls(net_poll_tag(c.id, ch));
                }
            }
        }
    }

    /// Put this iteration's frames on the wire.
    fn flush_sends(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let mut failed = None;
        for o in &mut c.out {
            if let Err(e) = o.flush() {
                failed = Some(e);
            }
        }
        if let Some(reason) = failed {
            let conn = c.id;
            let _ = self.tx.send(Event::PeerDown {
                conn,
                reason,
                eof: false,
            });
        }
    }

    fn status(&self) -> ResourceStatus {
        let mut core = self.core.status();
        core.witness.address = self.peer.witness_addr.map(|w| w.to_string());
        ResourceStatus {
            core,
            node: self.peer.local_node.clone(),
            device: self
                .loop_dev
                .as_ref()
                .map(|_| self.link.display().to_string()),
            backing_disk: self.disk_path.display().to_string(),
            io_backend: match self.disk {
                Backing::Ring(_) => IoBackend::IoUring,
                Backing::Thread(_) => IoBackend::PreadPwrite,
            },
            app_writes: AppWrites {
                completed: self.writes_done,
                latency_us_sum: self.write_latency_us_sum,
            },
            services: ServicesStatus {
                phase: self.promoter.phase(),
                last_failure: self.promoter.last_failure().map(String::from),
                list: self
                    .promoter
                    .services()
                    .map(|(s, state)| ServiceEntry {
                        name: s.name.clone(),
                        state,
                    })
                    .collect(),
            },
        }
    }

    fn report_changes(&mut self) {
        let key = self.core.state_key();
        if self.last_key == Some(key) {
            return;
        }
        self.last_key = Some(key);
        if self.events.receiver_count() == 0 {
            return;
        }
        let ev = serde_json::json!({
            "event": "change",
            "resource": self.name,
            "time_unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "status": self.status(),
        });
        let _ = self.events.send(ev.to_string());
    }
}

/// Carry the core's witness requests, one at a time, over one authenticated connection
/// that is opened on demand and dropped after any failure or timeout.
async fn witness_task(
    addr: std::net::SocketAddr,
    secret: Arc<Vec<u8>>,
    node: String,
    mut rx: mpsc::UnboundedReceiver<(witness::Request, u64)>,
    tx: EventTx,
) {
    let mut client: Option<net::WitnessClient> = None;
    let mut failures = 0u64;
    while let Some((req, timeout_ms)) = rx.recv().await {
        let call = async {
            if client.is_none() {
                client = Some(net::WitnessClient::connect(addr, &secret, &node).await?);
            }
            match client.as_mut() {
                Some(c) => c.call(req).await,
                None => Err(net::NetError::Unexpected("no witness connection")),
            }
        };
        let reply = match tokio::time::timeout(Duration::from_millis(timeout_ms), call).await {
            Ok(Ok(r)) => {
                failures = 0;
                Some(r)
            }
            Ok(Err(e)) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(witness = %addr, error = %e, "witness request failed");
                }
                client = None;
                None
            }
            Err(_) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(witness = %addr, timeout_ms, "witness did not answer in time");
                }
                client = None;
                None
            }
        };
        if !tx.send(Event::WitnessReply(reply)) {
            return;
        }
    }
}

/// What a `fence-peer` handler finds in its environment, as DRBD's handlers find
/// `DRBD_RESOURCE` and `DRBD_PEER`.
struct FencePeerEnv {
    resource: String,
    node: String,
    peer: String,
    peer_address: String,
}

/// Run the handler with `sh -c`; its exit code, or `None` if it could not start, was
/// killed by a signal, or ran past `timeout_ms` (it is killed then).
async fn run_fence_peer(cmd: &str, env: &FencePeerEnv, timeout_ms: u64) -> Option<i32> {
    let mut child = match tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("TANDEM_RESOURCE", &env.resource)
        .env("TANDEM_NODE", &env.node)
        .env("TANDEM_PEER", &env.peer)
        .env("TANDEM_PEER_ADDRESS", &env.peer_address)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(resource = %env.resource, command = cmd, error = %e, "cannot start the fence-peer handler");
            return None;
        }
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), child.wait()).await {
        Ok(Ok(st)) => {
            tracing::info!(resource = %env.resource, command = cmd, status = %st, "fence-peer handler exited");
            st.code()
        }
        Ok(Err(e)) => {
            tracing::error!(resource = %env.resource, command = cmd, error = %e, "lost the fence-peer handler");
            None
        }
        Err(_) => {
            tracing::error!(resource = %env.resource, command = cmd, timeout_ms, "the fence-peer handler ran too long; killing it");
            let _ = child.kill().await;
            None
        }
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

/// Why `dev` (linked as `link`) cannot go now: something still has it mounted or open.
/// Blocks for up to the settling time of [`frontend::in_use_settled`].
fn device_busy_error(link: &Path, dev: &Path) -> Option<String> {
    frontend::in_use_settled(dev).then(|| {
        let holders = frontend::holders(dev);
        let who = match holders.is_empty() {
            true => "mounted or held open".to_string(),
            false => holders.join(", "),
        };
        format!(
            "{} ({}) is in use ({who}); unmount it first",
            link.display(),
            dev.display()
        )
    })
}
