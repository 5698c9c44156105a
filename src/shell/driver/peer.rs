//! Peer connections: dialing with backoff, accepting, establishing the data and meta
//! channels, closing them, and flushing queued frames.

use super::*;

impl Driver {
    pub(super) fn maybe_dial(&mut self) {
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

    pub(super) fn on_accepted(
        &mut self,
        now: Instant,
        node: String,
        channel: u8,
        stream: TcpStream,
    ) {
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
                    self.node
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

    pub(super) fn establish(&mut self, now: Instant, data: TcpStream, meta: TcpStream) {
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
        self.node.handle_peer_connected(now);
    }

    /// Forget the connection: queued frames still go out, then the sockets close.
    pub(super) fn close_peer(&mut self) {
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
    pub(super) fn flush_sends(&mut self) {
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
}
