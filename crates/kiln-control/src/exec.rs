//! The exec relay: `kiln exec` reaches a guest through the control plane and the host's agent.
//!
//! Agents hold no listening port: the control plane queues an [`ExecRequest`] for the host, the
//! agent (long-polling `exec-requests`) opens a WebSocket back for that session, and the relay
//! splices the client's WebSocket to the agent's. Both carry guest-channel frames, so the relay
//! never interprets the bytes.
//!
//! 1. client: `GET /v1/apps/{app}/exec` upgrade; the relay checks scope, app and instance;
//! 2. relay: queues the session for the instance's host and waits up to [`AGENT_TIMEOUT`];
//! 3. agent: `GET /v1/hosts/{host}/exec/{session}` upgrade; the relay hands that socket over;
//! 4. relay: copies messages both ways until either side closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use tokio::sync::{oneshot, Notify};

use kiln_api::ExecRequest;
use kiln_types::HostId;

/// How long a client waits for the host's agent to pick its session up.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Sessions queued per host before new ones are refused.
pub const MAX_QUEUED: usize = 64;

/// Sessions waiting for one host's agent, and the signal that wakes its long-poll.
type HostQueue = (Vec<ExecRequest>, Arc<Notify>);

#[derive(Default)]
pub(crate) struct ExecBroker {
    queues: Mutex<HashMap<HostId, HostQueue>>,
    pending: Mutex<HashMap<String, oneshot::Sender<WebSocket>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ExecBroker {
    /// Queues a session for `host`; the receiver yields the agent's socket.
    pub fn request(&self, host: &HostId, req: ExecRequest) -> Option<oneshot::Receiver<WebSocket>> {
        let (tx, rx) = oneshot::channel();
        let mut queues = lock(&self.queues);
        let (queue, notify) = queues.entry(host.clone()).or_default();
        if queue.len() >= MAX_QUEUED {
            return None;
        }
        lock(&self.pending).insert(req.session.clone(), tx);
        queue.push(req);
        notify.notify_one();
        Some(rx)
    }

    /// Forgets a session nobody picked up.
    pub fn cancel(&self, session: &str) {
        lock(&self.pending).remove(session);
    }

    /// Waits (up to `wait`) for sessions queued for `host` and takes them.
    pub async fn take(&self, host: &HostId, wait: Duration) -> Vec<ExecRequest> {
        let notify = {
            let mut queues = lock(&self.queues);
            let (queue, notify) = queues.entry(host.clone()).or_default();
            if !queue.is_empty() {
                return std::mem::take(queue);
            }
            notify.clone()
        };
        let _ = tokio::time::timeout(wait, notify.notified()).await;
        let mut queues = lock(&self.queues);
        queues
            .get_mut(host)
            .map(|(q, _)| std::mem::take(q))
            .unwrap_or_default()
    }

    /// Hands the agent's socket to the waiting client; false when the session is unknown.
    pub fn attach(&self, session: &str, socket: WebSocket) -> bool {
        match lock(&self.pending).remove(session) {
            Some(tx) => tx.send(socket).is_ok(),
            None => false,
        }
    }
}

/// Copies messages both ways until either side closes.
pub(crate) async fn splice(mut client: WebSocket, mut agent: WebSocket) {
    loop {
        tokio::select! {
            m = client.recv() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(m @ Message::Binary(_))) => if agent.send(m).await.is_err() { break },
                Some(Ok(_)) => {}
            },
            m = agent.recv() => match m {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(m @ Message::Binary(_))) => if client.send(m).await.is_err() { break },
                Some(Ok(_)) => {}
            },
        }
    }
    // Close both sides gracefully and read until their Close: dropping a socket with unread
    // input makes the kernel send a reset, which would discard the client's last frames (Exit).
    let _ = client.send(Message::Close(None)).await;
    let _ = agent.send(Message::Close(None)).await;
    let drain = |mut ws: WebSocket| async move {
        while let Some(Ok(m)) = ws.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::join!(drain(client), drain(agent));
    })
    .await;
}
