//! Reporting: the resource's typed status and the change events `tandemctl events`
//! streams.

use super::*;

impl Driver {
    pub(super) fn status(&self) -> ResourceStatus {
        let mut core = self.node.resource().status();
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
                phase: self.node.promoter().phase(),
                last_failure: self.node.promoter().last_failure().map(String::from),
                list: self
                    .node
                    .promoter()
                    .services()
                    .map(|(s, state)| ServiceEntry {
                        name: s.name.clone(),
                        state,
                    })
                    .collect(),
            },
        }
    }

    pub(super) fn report_changes(&mut self) {
        let key = self.node.resource().state_key();
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
