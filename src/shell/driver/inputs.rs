//! Inputs the driver reads itself: frontend requests, peer frames and disconnects,
//! readiness of the frontend and the peer sockets, and disk completions.

use super::*;

impl Driver {
    pub(super) fn on_app(&mut self, now: Instant, r: AppRequest) {
        match r {
            AppRequest::Write { offset, data, done } => {
                let req = self.next_req;
                self.next_req += 1;
                let len = data.len() as u64;
                self.bufs.insert(req, Arc::new(data));
                self.writes.insert(req, (done, std::time::Instant::now()));
                self.node.handle_app_write(now, ReqId(req), offset, len);
            }
            AppRequest::Flush { done } => {
                let req = self.next_req;
                self.next_req += 1;
                self.flushes.insert(req, done);
                self.node.handle_app_flush(now, ReqId(req));
            }
            AppRequest::Read { offset, len, done } => {
                let size = self.node.resource().data_bytes();
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

    pub(super) fn on_peer_frame(&mut self, now: Instant, conn: u64, f: net::Frame) {
        if self.conn.as_ref().map(|c| c.id) != Some(conn) {
            return;
        }
        let buf = f.data.map(|d| {
            let id = RX_BUF_BIT | self.next_rx_buf;
            self.next_rx_buf += 1;
            self.bufs.insert(id, Arc::new(d));
            BufId(id)
        });
        self.node.handle_peer_message(now, f.term, f.msg, buf);
    }

    pub(super) fn on_peer_down(&mut self, now: Instant, conn: u64, reason: String, eof: bool) {
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
        self.node.handle_peer_disconnected(now, &reason);
        self.maybe_dial();
    }

    /// The ring says a peer socket is readable: take every frame it has.
    pub(super) fn on_peer_readable(&mut self, now: Instant, tag: u64) {
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
    pub(super) fn on_frontend_readable(&mut self, now: Instant) {
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

    pub(super) fn on_disk(&mut self, now: Instant, c: Completion) {
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
            IoKind::Write | IoKind::Flush => self.node.handle_disk_done(now, IoId(c.tag), ok),
            IoKind::Read { buf } => {
                if let Ok(Some(b)) = c.result {
                    self.bufs.insert(buf.0, Arc::new(b));
                }
                self.node.handle_disk_done(now, IoId(c.tag), ok);
            }
            IoKind::Meta if ok => {
                let tag = c.tag | META_SYNC_BIT;
                self.ios.insert(tag, IoKind::MetaSync { io: IoId(c.tag) });
                self.submit(tag, DiskOp::Flush);
            }
            IoKind::Meta => self.node.handle_disk_done(now, IoId(c.tag), false),
            IoKind::MetaSync { io } => self.node.handle_disk_done(now, io, ok),
        }
    }
}
