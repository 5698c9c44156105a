//! What the nodes ask for, carried out: replication I/O and messages, the device and
//! the services (with the seed's failures and delays), escalation, the fence-peer
//! handler; and the application, which writes and flushes while its node serves.

use super::*;

impl Sim {
    pub(super) fn act(&mut self, i: usize, a: nodecore::Action) {
        let inc = self.nodes[i].incarnation;
        let step_ms = 1 + self.rng.below(20);
        let at = self.now + step_ms;
        match a {
            nodecore::Action::Resource(a) => self.act_res(i, a),
            nodecore::Action::SetWritable(on) => self.nodes[i].writable = on,
            nodecore::Action::CheckDeviceFree => {
                let busy = self.mix.hit(self.mix.device_held);
                let step = DevStep::Checked { busy };
                self.push(at, Ev::Device { node: i, inc, step });
            }
            nodecore::Action::AttachDevice => {
                let ok = !self.mix.hit(self.mix.attach_fail);
                let step = DevStep::Attached { ok };
                self.push(at, Ev::Device { node: i, inc, step });
            }
            nodecore::Action::DetachDevice => {
                let running = self.nodes[i]
                    .node
                    .as_ref()
                    .is_some_and(|n| n.promoter().phase() != Phase::Idle);
                if running {
                    self.violation.get_or_insert_with(|| {
                        format!("node {i} lets the device go while its services run")
                    });
                }
                let in_use = self.mix.hit(self.mix.device_held);
                let step = DevStep::Detached { in_use };
                self.push(at, Ev::Device { node: i, inc, step });
            }
            nodecore::Action::StartService { idx } | nodecore::Action::StopService { idx } => {
                let start = matches!(a, nodecore::Action::StartService { .. });
                if start {
                    let ready = self.nodes[i].node.as_ref().is_some_and(|n| {
                        n.resource().role() == Role::Primary && n.device() == DeviceState::Present
                    });
                    if !ready {
                        self.violation.get_or_insert_with(|| {
                            format!(
                                "node {i} starts a service without being primary with its device"
                            )
                        });
                    }
                }
                let fail_rate = match start {
                    true => self.mix.service_start_fail,
                    false => self.mix.service_stop_fail,
                };
                let ok = !self.mix.hit(fail_rate);
                let ms = 1 + self.mix.rng.below(self.mix.service_max_ms);
                let n = &mut self.nodes[i];
                n.service_op += 1;
                let op = n.service_op;
                self.log(|| format!("node {i} service {idx} start {start} ({ms} ms, ok {ok})"));
                self.push(
                    self.now + ms,
                    Ev::Service {
                        node: i,
                        inc,
                        op,
                        idx,
                        start,
                        ok,
                    },
                );
            }
            nodecore::Action::AbortService => self.nodes[i].service_op += 1,
            nodecore::Action::Escalate(policy) => {
                self.log(|| format!("node {i} escalates: {policy:?}"));
                match policy {
                    OnDemoteFailure::None => {}
                    OnDemoteFailure::Exit | OnDemoteFailure::Reboot => self.crash(i),
                    OnDemoteFailure::Poweroff => {
                        self.crash(i);
                        // Back only when everything heals.
                        self.nodes[i].restart_at = None;
                    }
                }
            }
            nodecore::Action::Reply { to, result } => {
                self.log(|| format!("node {i} answers {to:?}: {result:?}"));
                if let Origin::Operator(id) = to {
                    self.admin_waiting.remove(&id);
                    if let Some((now_id, answer)) = &mut self.admin_now {
                        if *now_id == id {
                            *answer = Some(result);
                        }
                    }
                }
            }
            // The simulator stops no node gracefully.
            nodecore::Action::Stopped { .. } => {}
        }
    }

    /// Node `i` serves the application: primary, its device there and writable, every
    /// service started.
    pub(super) fn serving(&self, i: usize) -> bool {
        self.nodes[i].writable
            && self.nodes[i].node.as_ref().is_some_and(|n| {
                n.promoter().phase() == Phase::Running && n.device() == DeviceState::Present
            })
    }

    /// The application's requests in flight on node `i`.
    pub(super) fn app_on(&self, i: usize) -> usize {
        self.req_node.values().filter(|&&n| n == i).count()
    }

    /// The `fence-peer` handler of node `i`, as the seed's mix has it.
    pub(super) fn fence_peer(&mut self, i: usize, timeout_ms: u64) {
        let inc = self.nodes[i].incarnation;
        let (code, at) = match self.mix.stonith {
            None => (None, self.now),
            Some(Stonith::Fence(c)) => {
                self.log(|| format!("node {i} fences node {}", 1 - i));
                self.crash(1 - i);
                (Some(c), self.now + 10 + self.rng.below(200))
            }
            Some(Stonith::Exit(c)) => (Some(c), self.now + 10 + self.rng.below(200)),
            Some(Stonith::Hang) => (None, self.now + timeout_ms),
        };
        self.push(at, Ev::Fenced { node: i, inc, code });
    }

    pub(super) fn act_res(&mut self, i: usize, a: Action) {
        let inc = self.nodes[i].incarnation;
        let lat = match self.mix.hit(self.mix.slow_disk) {
            true => 20 + self.mix.rng.below(400),
            false => 1 + self.rng.below(4),
        };
        match a {
            Action::DiskWrite { io, offset, buf } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Write { offset, buf: buf.0 },
                },
            ),
            Action::DiskRead {
                io,
                offset,
                len,
                buf,
            } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Read {
                        offset,
                        len,
                        buf: buf.0,
                    },
                },
            ),
            Action::DiskFlush { io } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Flush,
                },
            ),
            Action::MetaWrite { io, offset, bytes } => self.push(
                self.now + lat,
                Ev::DiskDone {
                    node: i,
                    inc,
                    io: io.0,
                    kind: DiskKind::Meta { offset, bytes },
                },
            ),
            Action::Send { msg, buf, term } => {
                let Some(conn) = self.conn else { return };
                let own = self.res(i).map_or(0, |r| r.term());
                assert_eq!(term, own, "frames carry the sender's term");
                let data = buf.map(|b| {
                    self.nodes[i]
                        .bufs
                        .get(&b)
                        .cloned()
                        .expect("send of a released buffer")
                });
                assert_eq!(data.as_ref().map_or(0, |d| d.len() as u32), msg.data_len());
                let ch = msg.channel();
                let key = (1 - i, ch);
                // Now and then a slow path (a retransmit, a full socket).
                let lat = if self.witness.is_some() && self.rng.below(200) == 0 {
                    20 + self.rng.below(300)
                } else {
                    1 + self.rng.below(6)
                };
                let at = (self.now + lat).max(*self.chan_last.get(&key).unwrap_or(&0));
                self.chan_last.insert(key, at);
                self.seq += 1;
                let idx = self.seq;
                self.chan_fifo.entry(key).or_default().push_back(idx);
                self.msgs.insert(idx, (msg, data, term));
                self.push(
                    at,
                    Ev::Deliver {
                        to: 1 - i,
                        conn,
                        meta: ch == Channel::Meta,
                    },
                );
            }
            Action::ReleaseBuf(b) => {
                self.nodes[i].bufs.remove(&b);
            }
            Action::CompleteWrite { req, result } => {
                if result.is_ok() {
                    self.check_invariant_1(i, "write");
                }
                if self.req_node.remove(&req.0).is_some() {
                    self.app_in_flight -= 1;
                    if result.is_ok() {
                        self.model.completed_unflushed.push(req.0);
                        let modelled = self.model.writes.get(&req.0).copied();
                        if let (Protocol::C, Some((first, n))) = (self.protocol, modelled) {
                            for b in first..first + n {
                                let h = &self.model.history[&b];
                                let idx = h.iter().position(|&x| x == req.0).expect("in history");
                                let e = self.model.acked.entry(b).or_insert((0, 0));
                                if idx + 1 > e.0 {
                                    *e = (idx + 1, self.now);
                                }
                            }
                        }
                    }
                }
            }
            Action::CompleteFlush { req, result } => {
                if result.is_ok() {
                    self.check_invariant_1(i, "flush");
                }
                if self.req_node.remove(&req.0).is_some() {
                    self.app_in_flight -= 1;
                    let covers = self.model.flush_covers.remove(&req.0).unwrap_or_default();
                    if self.trace && result.is_ok() {
                        eprintln!(
                            "[{:>7}] node {i} flush {} ok covers {covers:?}",
                            self.now, req.0
                        );
                    }
                    if result.is_ok() {
                        self.check_invariant_2(i, &covers);
                        for w in covers {
                            let (first, n) = self.model.writes[&w];
                            for b in first..first + n {
                                let h = &self.model.history[&b];
                                let idx = h.iter().position(|&x| x == w).expect("write in history");
                                let e = self.model.flushed.entry(b).or_insert(0);
                                *e = (*e).max(idx + 1);
                            }
                        }
                    }
                }
            }
            Action::Disconnect { reason } => {
                // The closing core has already forgotten the peer; the peer still gets
                // what was sent before the close, then sees the connection end.
                if let Some(conn) = self.conn {
                    self.log(|| format!("node {i} closes connection {conn}: {reason}"));
                    let last = [Channel::Data, Channel::Meta]
                        .iter()
                        .filter_map(|c| self.chan_last.get(&(1 - i, *c)).copied())
                        .max()
                        .unwrap_or(self.now);
                    self.push(last.max(self.now) + 1, Ev::Close { to: 1 - i, conn });
                }
            }
            Action::SetConnect(on) => self.nodes[i].want_connect = on,
            Action::RoleChanged(role) => {
                self.log(|| format!("node {i} is now {role:?}"));
                if role == Role::Primary {
                    self.last_primary = i;
                    self.check_invariant_4(i);
                }
            }
            Action::FencePeer { timeout_ms } => self.fence_peer(i, timeout_ms),
            Action::FailBack | Action::AdminDone(_) => {
                self.violation.get_or_insert_with(|| {
                    format!("node {i} passed on an action the node answers itself")
                });
            }
            Action::Witness { req, timeout_ms } => {
                let id = self.next_wreq;
                self.next_wreq += 1;
                self.wreq.insert(id, (i, inc));
                self.push(self.now + timeout_ms, Ev::WitnessTimeout { to: i, inc, id });
                let up = self.witness.as_ref().is_some_and(|w| w.up);
                // TCP does not lose requests, but a reset connection does.
                if up && self.reachable(i, W) && self.rng.below(50) != 0 {
                    let d = self.witness_delay();
                    let name = self.nodes[i].name.clone();
                    if let Some(w) = self.witness.as_mut() {
                        w.requests.insert(id, (name, req));
                    }
                    self.push(self.now + d, Ev::WitnessArrive { from: i, id });
                }
            }
        }
    }

    pub(super) fn on_device(&mut self, node: usize, inc: u64, step: DevStep) {
        if self.nodes[node].incarnation != inc {
            return;
        }
        let now = self.local(node);
        let Some(n) = self.nodes[node].node.as_mut() else {
            return;
        };
        match step {
            DevStep::Checked { busy } => n.handle_device_checked(
                now,
                busy.then(|| "held by a process outside the services".into()),
            ),
            DevStep::Attached { ok } => n.handle_device_attached(
                now,
                match ok {
                    true => AttachOutcome::Ready,
                    false => AttachOutcome::Failed("simulated attach failure".into()),
                },
            ),
            DevStep::Detached { in_use } => n.handle_device_detached(
                now,
                match in_use {
                    true => DetachOutcome::InUse,
                    false => DetachOutcome::Detached,
                },
            ),
        }
        self.drain(node);
    }

    pub(super) fn on_service(&mut self, ev: Ev) {
        let Ev::Service {
            node,
            inc,
            op,
            idx,
            start,
            ok,
        } = ev
        else {
            return;
        };
        if self.nodes[node].incarnation != inc || self.nodes[node].service_op != op {
            return;
        }
        if !start && idx == DB && self.app_on(node) > 0 {
            // The database stops once its requests have ended.
            return self.push(self.now + 5, ev);
        }
        let now = self.local(node);
        if let Some(n) = self.nodes[node].node.as_mut() {
            n.handle_service_done(now, idx, ok);
        }
        self.drain(node);
    }

    pub(super) fn on_fenced(&mut self, node: usize, inc: u64, code: Option<i32>) {
        if self.nodes[node].incarnation != inc {
            return;
        }
        let now = self.local(node);
        if let Some(n) = self.nodes[node].node.as_mut() {
            n.handle_fence_peer_done(now, code);
        }
        self.drain(node);
    }

    pub(super) fn app_step(&mut self) {
        let Some(p) = self.primary().filter(|&p| self.serving(p)) else {
            return;
        };
        if self.app_in_flight >= 8 {
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        let now = self.local(p);
        // Requests that arrived during a pause are queued for the moment it ends; one
        // issued at that very moment must queue behind them, or it would overtake them.
        let paused = self.paused_until[p] >= self.now;
        if self.rng.below(6) == 0 {
            let covers = std::mem::take(&mut self.model.completed_unflushed);
            self.model.flush_covers.insert(req, covers);
            self.req_node.insert(req, p);
            self.app_in_flight += 1;
            if paused {
                self.queue_app(p, req, None);
            } else if let Some(r) = self.nodes[p].node.as_mut() {
                r.handle_app_flush(now, ReqId(req));
            }
        } else {
            let blocks = self.layout.data_bytes / BLOCK;
            let n = 1 + self.rng.below(4);
            let first = self.rng.below(blocks - n);
            let mut data = Vec::with_capacity((n * BLOCK) as usize);
            for b in first..first + n {
                data.extend_from_slice(&stamp(req, b));
                self.model.history.entry(b).or_default().push(req);
            }
            self.model.writes.insert(req, (first, n));
            self.nodes[p].bufs.insert(BufId(req), data);
            self.req_node.insert(req, p);
            self.app_in_flight += 1;
            if paused {
                self.queue_app(p, req, Some((first * BLOCK, n * BLOCK)));
            } else if let Some(r) = self.nodes[p].node.as_mut() {
                r.handle_app_write(now, ReqId(req), first * BLOCK, n * BLOCK);
            }
        }
        self.drain(p);
    }

    /// A request for paused node `p`: it handles it when the pause ends.
    pub(super) fn queue_app(&mut self, p: usize, req: u64, write: Option<(u64, u64)>) {
        let inc = self.nodes[p].incarnation;
        self.push(
            self.now,
            Ev::App {
                node: p,
                inc,
                req,
                write,
            },
        );
    }

    pub(super) fn on_app(&mut self, node: usize, inc: u64, req: u64, write: Option<(u64, u64)>) {
        if self.nodes[node].incarnation != inc {
            return;
        }
        let now = self.local(node);
        let Some(r) = self.nodes[node].node.as_mut() else {
            return;
        };
        match write {
            Some((off, len)) => r.handle_app_write(now, ReqId(req), off, len),
            None => r.handle_app_flush(now, ReqId(req)),
        }
        self.drain(node);
    }
}
