//! The agent's end of the exec relay (see kiln-control's `exec` module).
//!
//! The agent long-polls the sessions the control plane wants it to serve; for each it opens a
//! WebSocket back to the control plane, reads the client's `ExecStart`, starts the command over the
//! instance's guest channel, and forwards frames both ways, rewriting stream ids (the client always
//! speaks stream 0; the guest channel multiplexes many sessions).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use kiln_api::ExecRequest;
use kiln_types::frame::{ExitStatus, Frame};

use crate::Agent;

/// How long a session waits for the instance's guest channel to come up.
const GUEST_WAIT: Duration = Duration::from_secs(10);

/// Serves exec sessions forever.
pub(crate) async fn serve(agent: Arc<Agent>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match agent
            .client
            .exec_requests(&agent.host_id, Duration::from_secs(25))
            .await
        {
            Ok(requests) => {
                backoff = Duration::from_millis(200);
                for r in requests {
                    tokio::spawn(session(agent.clone(), r));
                }
            }
            Err(e) => {
                tracing::debug!(error = %crate::error_chain(&e), "cannot fetch exec requests; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn binary(frame: &Frame) -> Message {
    Message::Binary(frame.to_bytes().into())
}

async fn session(agent: Arc<Agent>, req: ExecRequest) {
    let path = format!("/v1/hosts/{}/exec/{}", agent.host_id, req.session);
    let mut ws = match agent.client.websocket(&path).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::warn!(session = %req.session, error = %crate::error_chain(&e), "cannot open exec session");
            return;
        }
    };
    let fail = |message: String| {
        [
            Frame::Error { stream: 0, message },
            Frame::Exit {
                stream: 0,
                status: ExitStatus {
                    code: Some(126),
                    signal: None,
                },
            },
        ]
    };
    // The first client frame must say what to run.
    let start = match ws.next().await {
        Some(Ok(Message::Binary(b))) => match Frame::decode(&b) {
            Ok(Some((Frame::ExecStart { start, .. }, _))) => start,
            _ => return,
        },
        _ => return,
    };
    let instance = agent.instances.lock().await.get(&req.instance_id).cloned();
    let Some(instance) = instance else {
        for f in fail(format!(
            "instance {} is not running on this host",
            req.instance_id
        )) {
            let _ = ws.send(binary(&f)).await;
        }
        return;
    };
    tracing::info!(instance_id = %req.instance_id, session = %req.session, tty = start.tty, "exec session started");
    let Some(mut guest) = instance.guest.exec(start, GUEST_WAIT).await else {
        for f in fail("the instance's guest channel is not available".into()) {
            let _ = ws.send(binary(&f)).await;
        }
        return;
    };
    loop {
        tokio::select! {
            from_guest = guest.frames.recv() => {
                let Some(frame) = from_guest else {
                    for f in fail("the guest channel closed".into()) {
                        let _ = ws.send(binary(&f)).await;
                    }
                    break;
                };
                let last = matches!(frame, Frame::Exit { .. });
                let frame = with_stream(frame, 0);
                if ws.send(binary(&frame)).await.is_err() || last {
                    break;
                }
            }
            from_client = ws.next() => {
                let bytes = match from_client {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        // The client went away: stop what it started.
                        guest.send(Frame::Signal { stream: guest.stream, signal: 9 }).await;
                        break;
                    }
                    Some(Ok(_)) => continue,
                };
                if let Ok(Some((frame, _))) = Frame::decode(&bytes) {
                    if matches!(frame, Frame::Stdin { .. } | Frame::StdinClose { .. } | Frame::Resize { .. } | Frame::Signal { .. }) {
                        guest.send(with_stream(frame, guest.stream)).await;
                    }
                }
            }
        }
    }
    // Read until the relay's Close so no unread input turns our close into a reset.
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The same frame on another stream id.
fn with_stream(frame: Frame, id: u32) -> Frame {
    match frame {
        Frame::ExecStart { start, .. } => Frame::ExecStart { stream: id, start },
        Frame::Stdin { bytes, .. } => Frame::Stdin { stream: id, bytes },
        Frame::StdinClose { .. } => Frame::StdinClose { stream: id },
        Frame::Stdout { bytes, .. } => Frame::Stdout { stream: id, bytes },
        Frame::Stderr { bytes, .. } => Frame::Stderr { stream: id, bytes },
        Frame::Resize { rows, cols, .. } => Frame::Resize {
            stream: id,
            rows,
            cols,
        },
        Frame::Signal { signal, .. } => Frame::Signal { stream: id, signal },
        Frame::Exit { status, .. } => Frame::Exit { stream: id, status },
        Frame::Error { message, .. } => Frame::Error {
            stream: id,
            message,
        },
        // Stream 0 only; the relay never forwards a client's secrets frame to the guest.
        other @ (Frame::Hello { .. } | Frame::Log { .. } | Frame::Secrets { .. }) => other,
    }
}
