//! The simulated witness: the real witness core behind a lossy, slow link, with its
//! own clock, crashes and restarts from its state, and failing state writes.

use super::*;

pub(super) struct WitnessSim {
    pub(super) core: Witness,
    pub(super) up: bool,
    pub(super) drift_permille: i64,
    pub(super) requests: HashMap<u64, (String, wcore::Request)>,
    pub(super) replies: HashMap<u64, wcore::Reply>,
}

impl Sim {
    pub(super) fn witness_now(&self) -> Instant {
        let d = self.witness.as_ref().map_or(0, |w| w.drift_permille);
        Instant((self.now as i64 * (1000 + d) / 1000) as u64)
    }

    /// One way to or from the witness: mostly quick, now and then later than the timeout.
    pub(super) fn witness_delay(&mut self) -> u64 {
        let max = if self.rng.below(20) == 0 { 400 } else { 8 };
        1 + self.rng.below(max)
    }

    pub(super) fn on_witness_arrive(&mut self, from: usize, id: u64) {
        let wnow = self.witness_now();
        let Some(w) = self.witness.as_mut() else {
            return;
        };
        let Some((node, req)) = w.requests.remove(&id) else {
            return;
        };
        if !w.up {
            return;
        }
        let out = w.core.handle(wnow, &node, &req);
        // The witness stores a change before it answers; a failed write refuses
        // and changes nothing.
        let store_fails = out.persist.is_some() && self.mix.hit(self.mix.witness_store_fail);
        let w = self.witness.as_mut().expect("witness");
        let reply = match out.persist {
            None => out.reply,
            Some(_) if store_fails => w.core.unstored(&req.resource, "simulated write error"),
            Some(staged) => {
                w.core.commit(staged);
                out.reply
            }
        };
        if req.op == wcore::Op::Promote && reply.granted && reply.term > self.granted.0 {
            self.granted = (reply.term, self.now);
            self.log(|| format!("WITNESS grants term {} to {node}", reply.term));
        }
        self.log(|| format!("witness {:?} from {node}: {reply:?}", req.op));
        if self.reachable(W, from) && self.rng.below(50) != 0 {
            let d = self.witness_delay();
            let inc = self.wreq.get(&id).map_or(0, |e| e.1);
            if let Some(w) = self.witness.as_mut() {
                w.replies.insert(id, reply);
            }
            self.push(self.now + d, Ev::WitnessAnswer { to: from, inc, id });
        }
    }

    pub(super) fn on_witness_answer(&mut self, to: usize, inc: u64, id: u64) {
        let reply = self.witness.as_mut().and_then(|w| w.replies.remove(&id));
        if self.wreq.get(&id) != Some(&(to, inc)) || self.nodes[to].incarnation != inc {
            return;
        }
        self.wreq.remove(&id);
        let now = self.local(to);
        if let Some(r) = self.nodes[to].node.as_mut() {
            r.handle_witness_reply(now, reply);
        }
        self.drain(to);
    }

    pub(super) fn on_witness_timeout(&mut self, to: usize, inc: u64, id: u64) {
        if self.wreq.remove(&id).is_none() || self.nodes[to].incarnation != inc {
            return;
        }
        let now = self.local(to);
        if let Some(r) = self.nodes[to].node.as_mut() {
            r.handle_witness_reply(now, None);
        }
        self.drain(to);
    }

    pub(super) fn on_witness_restart(&mut self) {
        let wnow = self.witness_now();
        if let Some(w) = self.witness.as_mut() {
            let state = w.core.state().clone();
            w.core = Witness::new(LEASE_MS, wnow, state);
            w.up = true;
        }
        self.log(|| "witness restarted".into());
    }
}
