//! Carrying out the core's actions: disk I/O, sends, witness requests, the fence-peer
//! handler, admin answers and buffers.

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
}
