//! Carrying out the core's actions: disk I/O, sends, witness requests, the fence-peer
//! handler and buffers.

use super::*;

impl Driver {
    pub(super) fn act(&mut self, a: Action) {
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
                    self.node.handle_disk_done(now, io, false);
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
            Action::RoleChanged(role) => {
                tracing::info!(resource = %self.name, ?role, "role changed");
            }
            // The node answers these itself and never passes them on.
            Action::FailBack | Action::AdminDone(_) => {}
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
                    self.node.handle_fence_peer_done(now, None);
                }
            },
            Action::Witness { req, timeout_ms } => match &self.witness_tx {
                Some(w) if w.send((req, timeout_ms)).is_ok() => {}
                _ => {
                    let now = self.now();
                    self.node.handle_witness_reply(now, None);
                }
            },
        }
    }
}
