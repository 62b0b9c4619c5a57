//! The byte relay behind an upgraded (WebSocket) connection in the proxy, and how a drain ends
//! one: the app's frames to the client are followed header by header, so the proxy can stop at
//! a frame boundary and send the client a WebSocket close frame (1001, going away) instead of
//! cutting the connection mid-stream. Frames are passed through untouched (extensions such as
//! permessage-deflate included): only their headers are read.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The close code sent to a client whose WebSocket outlived the drain (RFC 6455: "going away").
pub const GOING_AWAY: u16 = 1001;
/// The close reason sent with it.
const CLOSE_REASON: &[u8] = b"the release is being replaced";
/// After the close is asked for, the frame under way may take this long to finish.
const FRAME_FINISH: Duration = Duration::from_secs(1);
/// After the close frame, the client may take this long to answer it before both ends go.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// A connection told to close is dropped this long after, whatever it is doing (a client that
/// stops reading cannot hold it open).
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(3);

/// Follows the frames of one direction of a WebSocket: where each header and payload ends.
/// A pure state machine over the bytes that pass.
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    header: [u8; 14],
    have: usize,
    payload_left: u64,
}

/// The length of a frame header, known from its first two bytes: 2, plus 2 or 8 bytes of
/// extended length, plus 4 of masking key.
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length of a complete frame header.
fn payload_len(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[2..10]);
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    }
}

impl FrameTracker {
    /// Whether the bytes so far end exactly between two frames.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Takes in `data` as it passes; returns how many of its bytes were taken. All of them,
    /// unless `stop_at_boundary`: then it stops at the first frame boundary (0 when the
    /// stream is between frames already), so the caller can send what was taken and then a
    /// frame of its own.
    pub fn feed(&mut self, data: &[u8], stop_at_boundary: bool) -> usize {
        let mut i = 0;
        while i < data.len() {
            if stop_at_boundary && self.at_boundary() {
                return i;
            }
            if self.payload_left > 0 {
                let n =
                    (data.len() - i).min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                i += n;
                self.payload_left -= n as u64;
                continue;
            }
            self.header[self.have] = data[i];
            self.have += 1;
            i += 1;
            if self.have >= 2 && self.have == header_len(self.header[1]) {
                self.payload_left = payload_len(&self.header[..self.have]);
                self.have = 0;
            }
        }
        i
    }
}

/// A close frame as a server sends it (unmasked): `code` and a short reason.
pub fn close_frame(code: u16) -> Vec<u8> {
    let mut frame = vec![0x88, (2 + CLOSE_REASON.len()) as u8];
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(CLOSE_REASON);
    frame
}

/// How the app-to-client direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The app closed its side (or the connection failed).
    Upstream,
    /// The proxy sent the client a close frame.
    CloseSent,
}

/// Copies the app's frames to the client until the app closes, or `close` fires: then the
/// frame under way finishes (for at most [`FRAME_FINISH`]), the client gets a close frame
/// (1001) and its write side is shut.
async fn frames_to_client<R, W>(from: &mut R, to: &mut W, close: &CancellationToken) -> Ended
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = FrameTracker::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut closing = false;
    loop {
        let read = if closing {
            if frames.at_boundary() {
                let _ = to.write_all(&close_frame(GOING_AWAY)).await;
                let _ = to.flush().await;
                let _ = to.shutdown().await;
                return Ended::CloseSent;
            }
            match tokio::time::timeout(FRAME_FINISH, from.read(&mut buf)).await {
                Ok(read) => read,
                // A frame that does not finish: nothing better than cutting it.
                Err(_) => return Ended::Upstream,
            }
        } else {
            tokio::select! {
                read = from.read(&mut buf) => read,
                _ = close.cancelled() => {
                    closing = true;
                    continue;
                }
            }
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Ended::Upstream;
            }
            Ok(n) => n,
        };
        let take = frames.feed(&buf[..n], closing);
        if to.write_all(&buf[..take]).await.is_err() {
            return Ended::Upstream;
        }
    }
}

/// Splices a client's upgraded WebSocket connection to the app's: the client's bytes go to the
/// app as they are; the app's go to the client frame by frame, so that when `close` fires the
/// client gets a close frame (1001) at a frame boundary, then a moment to answer it (its answer
/// reaches the app), and both connections end. Returns whether a close frame was sent.
pub async fn splice_websocket<C, U>(client: C, upstream: U, close: CancellationToken) -> bool
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut app_rx, mut app_tx) = tokio::io::split(upstream);
    let up = async {
        let _ = tokio::io::copy(&mut client_rx, &mut app_tx).await;
        let _ = app_tx.shutdown().await;
    };
    let down = frames_to_client(&mut app_rx, &mut client_tx, &close);
    let hard_stop = async {
        close.cancelled().await;
        tokio::time::sleep(CLOSE_DEADLINE).await;
    };
    tokio::pin!(up, down, hard_stop);
    tokio::select! {
        _ = &mut hard_stop => false,
        _ = &mut up => {
            // The client is done sending; the app's side ends when the app closes.
            tokio::select! {
                ended = &mut down => ended == Ended::CloseSent,
                _ = &mut hard_stop => false,
            }
        }
        ended = &mut down => {
            // The app's side is over: the client's last bytes (its close answer) may still
            // flow to the app, for a moment.
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut up).await;
            ended == Ended::CloseSent
        }
    }
}

/// Splices any other upgraded protocol byte for byte; when `close` fires, both connections end
/// (the proxy cannot end an unknown protocol more politely).
pub async fn splice_raw<C, U>(mut client: C, mut upstream: U, close: CancellationToken)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = close.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a server (unmasked) or a client (`mask`) sends it.
    fn frame(opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        let m = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xffff => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn frame_boundaries_are_found_whatever_the_lengths_and_chunks() {
        let big = vec![7u8; 70_000];
        let mid = vec![8u8; 300];
        let frames = [
            frame(0x1, b"hello", false),
            frame(0x1, b"", false),
            frame(0x2, &mid, false),
            frame(0x2, &big, false),
            frame(0x9, b"ping", true),
        ];
        let stream: Vec<u8> = frames.concat();
        // Fed whole, byte by byte, and in odd chunks: it ends between frames, never inside.
        for chunk in [stream.len(), 1, 3, 1000, 65_536] {
            let mut t = FrameTracker::default();
            for part in stream.chunks(chunk) {
                assert_eq!(t.feed(part, false), part.len());
            }
            assert!(t.at_boundary(), "chunk {chunk}");
        }
        // A partial frame is not a boundary.
        let mut t = FrameTracker::default();
        t.feed(&stream[..frames[0].len() + 1], false);
        assert!(!t.at_boundary());
        // Stopping at a boundary takes exactly one frame's bytes, then nothing more.
        let mut t = FrameTracker::default();
        t.feed(&frames[0][..3], false);
        let rest = &stream[3..];
        assert_eq!(t.feed(rest, true), frames[0].len() - 3);
        assert!(t.at_boundary());
        assert_eq!(t.feed(&stream[frames[0].len()..], true), 0);
        // The empty frame ends with its two-byte header.
        let mut t = FrameTracker::default();
        let from_empty = &stream[frames[0].len()..];
        assert_eq!(t.feed(&from_empty[..1], false), 1);
        assert_eq!(t.feed(&from_empty[1..], true), 1);
        assert!(t.at_boundary());
    }

    #[test]
    fn the_close_frame_carries_1001_and_a_reason() {
        let f = close_frame(GOING_AWAY);
        assert_eq!(f[0], 0x88, "FIN + close opcode");
        assert_eq!(f[1] as usize, f.len() - 2, "unmasked, length in the header");
        assert!(
            f.len() - 2 <= 125,
            "a control frame's payload is at most 125 bytes"
        );
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 1001);
        let mut t = FrameTracker::default();
        assert_eq!(t.feed(&f, false), f.len());
        assert!(t.at_boundary());
    }

    #[tokio::test]
    async fn a_close_waits_for_the_frame_under_way_then_sends_1001() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (upstream, mut app) = tokio::io::duplex(1 << 16);
        let close = CancellationToken::new();
        let relay = tokio::spawn(splice_websocket(client, upstream, close.clone()));
        // The app sends half a frame; the close is asked for in the middle of it.
        let hello = frame(0x1, b"hello world", false);
        app.write_all(&hello[..5]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        close.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.write_all(&hello[5..]).await.unwrap();
        // Bytes after the boundary are not passed on: a frame after the close is not allowed.
        app.write_all(&frame(0x1, b"late", false)).await.unwrap();
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        let mut want = hello.clone();
        want.extend_from_slice(&close_frame(GOING_AWAY));
        assert_eq!(got, want);
        // The client's answer reaches the app, then the relay ends.
        let answer = frame(0x8, &1001u16.to_be_bytes(), true);
        client_peer.write_all(&answer).await.unwrap();
        drop(client_peer);
        assert!(relay.await.unwrap(), "a close frame was sent");
        let mut at_app = Vec::new();
        app.read_to_end(&mut at_app).await.unwrap();
        assert_eq!(at_app, answer);
    }

    #[tokio::test]
    async fn without_a_close_bytes_flow_both_ways_until_the_app_ends() {
        let (client, mut client_peer) = tokio::io::duplex(1 << 16);
        let (upstream, mut app) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(splice_websocket(client, upstream, CancellationToken::new()));
        let ping = frame(0x1, b"ping", true);
        client_peer.write_all(&ping).await.unwrap();
        let mut buf = vec![0u8; ping.len()];
        app.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, ping);
        let pong = frame(0x1, b"pong", false);
        app.write_all(&pong).await.unwrap();
        drop(app);
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, pong, "no close frame of the proxy's own");
        drop(client_peer);
        assert!(!relay.await.unwrap());
    }
}
