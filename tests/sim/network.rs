//! The simulated network between the two nodes: one FIFO per direction and channel,
//! cuts that hold messages back, closes that deliver what was sent first, connections.

use super::*;

impl Sim {
    pub(super) fn maybe_connect(&mut self) {
        if self.conn.is_some() || !self.link_up || self.cut[0][1] || self.cut[1][0] {
            return;
        }
        if self.paused(0) || self.paused(1) {
            return;
        }
        if self
            .nodes
            .iter()
            .all(|n| n.node.is_some() && n.want_connect)
        {
            let c = self.next_conn;
            self.next_conn += 1;
            self.conn = Some(c);
            self.chan_last.clear();
            self.log(|| format!("connection {c} up"));
            for i in 0..2 {
                let now = self.local(i);
                if let Some(r) = self.nodes[i].node.as_mut() {
                    r.handle_peer_connected(now);
                }
                self.drain(i);
            }
        }
    }

    pub(super) fn break_conn(&mut self, why: &str) {
        if let Some(c) = self.conn.take() {
            self.log(|| format!("connection {c} broken: {why}"));
            self.held = [VecDeque::new(), VecDeque::new()];
            // What the connection still carried is gone with it.
            self.msgs.clear();
            self.chan_fifo.clear();
            for i in 0..2 {
                let now = self.local(i);
                if let Some(r) = self.nodes[i].node.as_mut() {
                    r.handle_peer_disconnected(now, why);
                }
                self.drain(i);
            }
        }
    }

    /// Release peer messages held behind directions that are open again, in order.
    pub(super) fn release_held(&mut self) {
        for to in 0..2 {
            if self.cut[1 - to][to] {
                continue;
            }
            let at = self.now + 1;
            for ev in std::mem::take(&mut self.held[to]) {
                self.push(at, ev);
            }
            for ch in [Channel::Data, Channel::Meta] {
                let e = self.chan_last.entry((to, ch)).or_insert(0);
                *e = (*e).max(at);
            }
        }
    }

    pub(super) fn on_close(&mut self, to: usize, conn: u64) {
        if self.conn == Some(conn) {
            // The peer reads everything sent before the close first (TCP FIN),
            // also what a cut or a pause held back behind it.
            for ch in [Channel::Data, Channel::Meta] {
                let pending = self.chan_fifo.get(&(to, ch)).map_or(0, |q| q.len());
                for _ in 0..pending {
                    self.run_event(Ev::Deliver {
                        to,
                        conn,
                        meta: ch == Channel::Meta,
                    });
                    if self.conn != Some(conn) {
                        break;
                    }
                }
            }
            if self.conn == Some(conn) {
                self.break_conn("closed by peer");
            }
        }
    }

    pub(super) fn on_deliver(&mut self, to: usize, conn: u64, meta: bool) {
        // A connection that is gone carries nothing more (its messages went with
        // it); on the live one, whichever delivery fires, the oldest message of
        // its channel arrives.
        if self.conn != Some(conn) {
            return;
        }
        let ch = if meta { Channel::Meta } else { Channel::Data };
        let Some(msg_idx) = self
            .chan_fifo
            .get_mut(&(to, ch))
            .and_then(|q| q.pop_front())
        else {
            return;
        };
        let Some((msg, data, term)) = self.msgs.remove(&msg_idx) else {
            return;
        };
        if self.nodes[to].node.is_none() {
            return;
        }
        let buf = data.map(|d| {
            let id = BufId(1_000_000_000 + msg_idx);
            self.nodes[to].bufs.insert(id, d);
            id
        });
        let now = self.local(to);
        if let Some(r) = self.nodes[to].node.as_mut() {
            r.handle_peer_message(now, term, msg, buf);
        }
        self.drain(to);
    }
}
