//! HTTP checks against an app's container: the health check a deploy waits for and the smoke
//! checks it runs before traffic moves (an HTTP request, or a WebSocket that is sent a message
//! and must answer). One request per call, on its own connection, bounded by a timeout. The only
//! module that speaks HTTP *to* apps as a client (the proxy forwards).

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// At most this much of a body is read (smoke checks look for a string in it).
const MAX_BODY: usize = 64 * 1024;

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Why a check got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// Nothing listens yet, or the connection closed before an answer: an app still starting.
    #[error("no answer ({0})")]
    NotListening(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Protocol(String),
    /// A WebSocket check that upgraded but got no fitting answer, or no upgrade.
    #[error("{0}")]
    WebSocket(String),
}

/// `GET path` on `addr`, within `timeout`.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Answer, CheckError> {
    match tokio::time::timeout(timeout, request(addr, path)).await {
        Ok(result) => result,
        Err(_) => Err(CheckError::Timeout(timeout)),
    }
}

async fn request(addr: SocketAddr, path: &str) -> Result<Answer, CheckError> {
    let not_listening = |e: &dyn std::fmt::Display| CheckError::NotListening(e.to_string());
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| not_listening(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| not_listening(&e))?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "drover-agent")
        .body(Empty::<Bytes>::new())
        .map_err(|e| CheckError::Protocol(e.to_string()))?;
    // A connection that fails before an answer is what a port with nothing behind it yet does
    // (Docker's userland proxy accepts, then finds no listener and resets).
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| not_listening(&e))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Ok(Answer { status, body })
}

/// A WebSocket probe: connects to `ws://addr{path}`, sends `message` as a text message and
/// returns the first text or binary message answered (at most 64 KiB). The upgrade and the
/// answer each get `timeout`.
pub async fn websocket(
    addr: SocketAddr,
    path: &str,
    message: &str,
    timeout: Duration,
) -> Result<String, CheckError> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    let ws_err = |e: &dyn std::fmt::Display| CheckError::WebSocket(e.to_string());
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(CheckError::NotListening(e.to_string())),
        Err(_) => return Err(CheckError::Timeout(timeout)),
    };
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .map_err(|e| CheckError::Protocol(e.to_string()))?;
    request.headers_mut().insert(
        hyper::header::USER_AGENT,
        hyper::header::HeaderValue::from_static("drover-agent"),
    );
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_BODY))
        .max_frame_size(Some(MAX_BODY));
    let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
    let mut ws = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(WsError::Http(response))) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Err(CheckError::WebSocket(format!(
                "answered {} instead of upgrading to a WebSocket: {}",
                response.status().as_u16(),
                first_line(&body)
            )));
        }
        Ok(Err(e)) => return Err(ws_err(&format!("the WebSocket upgrade failed: {e}"))),
        Err(_) => {
            return Err(ws_err(&format!("no WebSocket upgrade within {timeout:?}")));
        }
    };
    ws.send(Message::text(message))
        .await
        .map_err(|e| ws_err(&format!("cannot send the message: {e}")))?;
    let answer = tokio::time::timeout(timeout, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
                Some(Ok(Message::Binary(data))) => {
                    return Ok(String::from_utf8_lossy(&data).into_owned());
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ws_err(&format!(
                        "the WebSocket was closed without an answer{}",
                        frame
                            .map(|f| format!(" (code {})", u16::from(f.code)))
                            .unwrap_or_default()
                    )));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ws_err(&format!("the WebSocket failed: {e}"))),
                None => {
                    return Err(ws_err(&"the connection ended without an answer"));
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(ws_err(&format!(
            "no answer to the message within {timeout:?}"
        )))
    });
    // Leave politely, but never wait long for it.
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    answer
}

/// Checks a WebSocket answer against a smoke check's expectation.
pub fn websocket_verdict(answer: &str, expect: Option<&str>) -> Result<(), Mismatch> {
    match expect {
        Some(needle) if !answer.contains(needle) => Err(Mismatch::Answer {
            expected: needle.to_string(),
            first_line: first_line(answer).to_string(),
        }),
        _ => Ok(()),
    }
}

/// What differed between a smoke check's expectation and the answer (its first line quoted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("answered {status} (expected {expected}): {first_line}")]
    Status {
        status: u16,
        expected: u16,
        first_line: String,
    },
    #[error("the body does not contain {expected:?}: {first_line}")]
    Body {
        expected: String,
        first_line: String,
    },
    /// A WebSocket answer.
    #[error("the answer does not contain {expected:?}: {first_line}")]
    Answer {
        expected: String,
        first_line: String,
    },
}

/// Whether an answer counts as healthy: 2xx or 3xx.
pub fn healthy(answer: &Answer) -> bool {
    (200..400).contains(&answer.status)
}

/// Checks an answer against a smoke check's expectation; the error says what differed.
pub fn smoke_verdict(
    answer: &Answer,
    want_status: u16,
    body_contains: Option<&str>,
) -> Result<(), Mismatch> {
    if answer.status != want_status {
        return Err(Mismatch::Status {
            status: answer.status,
            expected: want_status,
            first_line: first_line(&answer.body).to_string(),
        });
    }
    if let Some(needle) = body_contains
        && !answer.body.contains(needle)
    {
        return Err(Mismatch::Body {
            expected: needle.to_string(),
            first_line: first_line(&answer.body).to_string(),
        });
    }
    Ok(())
}

fn first_line(body: &str) -> String {
    let line = body.lines().next().unwrap_or("").trim();
    let mut out: String = line.chars().take(120).collect();
    if line.chars().count() > 120 {
        out.push('…');
    }
    if out.is_empty() {
        "(empty body)".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoke_verdicts_name_what_differed() {
        let a = Answer {
            status: 200,
            body: "smoke ok version=v1\n".into(),
        };
        assert!(smoke_verdict(&a, 200, Some("ok")).is_ok());
        assert!(smoke_verdict(&a, 200, None).is_ok());
        let e = smoke_verdict(&a, 204, None).unwrap_err().to_string();
        assert!(e.contains("answered 200 (expected 204)"), "{e}");
        let e = smoke_verdict(&a, 200, Some("v2")).unwrap_err().to_string();
        assert!(e.contains("does not contain \"v2\""), "{e}");
        let empty = Answer {
            status: 500,
            body: String::new(),
        };
        assert!(
            smoke_verdict(&empty, 200, None)
                .unwrap_err()
                .to_string()
                .contains("(empty body)")
        );
        assert!(healthy(&a) && !healthy(&empty));
    }

    #[test]
    fn websocket_verdicts_name_what_differed() {
        assert!(websocket_verdict("ping", Some("ping")).is_ok());
        assert!(websocket_verdict("anything", None).is_ok());
        let e = websocket_verdict("pong\nmore", Some("ping"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the answer does not contain \"ping\": pong");
    }

    #[tokio::test]
    async fn nothing_listening_is_told_apart_from_a_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = get(addr, "/", Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, CheckError::NotListening(_)), "{err}");

        // Accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let err = get(addr, "/", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err, CheckError::Timeout(Duration::from_millis(200)));
        drop(silent);
    }
}
