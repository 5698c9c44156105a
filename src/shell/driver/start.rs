//! Starting a resource: open the backing disk (with io_uring where allowed), attach the
//! frontend, spawn the witness task and the listener, and hand the core to its thread.

use super::*;

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
        node: Node::new(
            s.core,
            NodeParams {
                services: s.services.iter().map(Service::spec).collect(),
                on_demote_failure: s.on_demote_failure,
                device_label: s.link.display().to_string(),
            },
            Instant(0),
        ),
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
        shutdown: None,
        stopped: false,
        witness_tx,
        replies: HashMap::new(),
        next_reply: 1,
        services: Arc::new(s.services),
        service_task: None,
    };
    std::thread::Builder::new()
        .name(format!("tandem-{name}"))
        .spawn(move || d.run(rx))
        .map_err(disk_err)?;
    Ok(Handle { name, tx, events })
}
