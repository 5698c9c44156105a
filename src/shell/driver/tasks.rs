//! The async tasks the driver spawns: the witness connection and the `fence-peer`
//! handler. They carry out one request each and report back as events; they decide
//! nothing.

use super::*;

/// Carry the core's witness requests, one at a time, over one authenticated connection
/// that is opened on demand and dropped after any failure or timeout.
pub(super) async fn witness_task(
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
pub(super) struct FencePeerEnv {
    pub(super) resource: String,
    pub(super) node: String,
    pub(super) peer: String,
    pub(super) peer_address: String,
}

/// Run the handler with `sh -c`; its exit code, or `None` if it could not start, was
/// killed by a signal, or ran past `timeout_ms` (it is killed then).
pub(super) async fn run_fence_peer(cmd: &str, env: &FencePeerEnv, timeout_ms: u64) -> Option<i32> {
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
