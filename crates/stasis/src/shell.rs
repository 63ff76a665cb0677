//! `stasis computer shell ID`: an interactive terminal in a computer. It opens a terminal
//! (`POST /computers/{id}/terminal`, the size of this one), attaches to its stream, puts this
//! terminal in raw mode (restored on the way out, however that goes), passes keystrokes in and
//! output out, follows this terminal's size, and exits with the shell's exit code. With input
//! that is not a terminal (a pipe, a file), it is read as typed and ends the shell's input.

use std::io::Write;

use anyhow::{anyhow, Context, Result};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Api;
use crate::client::ExitCode;

/// This terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, &self.saved);
    }
}

fn size_of_this_terminal() -> Option<(u16, u16)> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// `ws://host:port/api/v1/...` for the server path `path` (which starts with `/api/v1`).
fn socket_url(base: &str, path: &str) -> Result<String> {
    let origin = base
        .find("/api/")
        .map(|i| &base[..i])
        .unwrap_or(base.trim_end_matches('/'));
    if let Some(rest) = origin.strip_prefix("http://") {
        Ok(format!("ws://{rest}{path}"))
    } else if let Some(rest) = origin.strip_prefix("https://") {
        Ok(format!("wss://{rest}{path}"))
    } else {
        Err(anyhow!("the API address {base} is not http:// or https://"))
    }
}

pub async fn shell(api: &Api, id: &str) -> Result<()> {
    let interactive = rustix::termios::isatty(std::io::stdin()) && rustix::termios::isatty(std::io::stdout());
    let (rows, cols) = size_of_this_terminal().unwrap_or((24, 80));
    let made = api
        .call(
            Method::POST,
            &format!("/computers/{id}/terminal"),
            Some(json!({"rows": rows, "cols": cols})),
        )
        .await?;
    let path = made["stream_url"]
        .as_str()
        .ok_or_else(|| anyhow!("the server's terminal has no stream_url: {made}"))?;
    let mut request = socket_url(api.base(), path)?.into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", api.key()).parse()?);
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("attaching to the terminal of computer {id}"))?;
    let (mut sink, mut frames) = socket.split();
    let raw = if interactive { Some(RawMode::enter()?) } else { None };

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(16);
    let keys = tx.clone();
    let reader = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if keys.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
        // Input that was not typed has ended: so does the shell's.
        let _ = keys
            .send(Message::Text(json!({"type": "stdin_close"}).to_string().into()))
            .await;
    });
    let resizes = tx.clone();
    let winch = tokio::spawn(async move {
        let Ok(mut changes) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
            return;
        };
        while changes.recv().await.is_some() {
            if let Some((rows, cols)) = size_of_this_terminal() {
                let frame = json!({"type": "resize", "rows": rows, "cols": cols}).to_string();
                if resizes.send(Message::Text(frame.into())).await.is_err() {
                    return;
                }
            }
        }
    });
    drop(tx);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
    });

    let mut code = None;
    let mut out = std::io::stdout();
    while let Some(frame) = frames.next().await {
        let text = match frame {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match v["type"].as_str() {
            Some("stdout" | "stderr") => {
                let _ = out.write_all(v["data"].as_str().unwrap_or("").as_bytes());
                let _ = out.flush();
            }
            Some("exit") => {
                code = v["code"].as_i64();
                break;
            }
            Some("error") => {
                eprint!("\r\nstasis: {}\r\n", v["message"].as_str().unwrap_or("error"));
            }
            _ => {}
        }
    }
    reader.abort();
    winch.abort();
    writer.abort();
    drop(raw);
    match code {
        Some(0) => Ok(()),
        Some(c) => Err(ExitCode(c.clamp(1, 255) as i32).into()),
        None => Err(anyhow!("the terminal of computer {id} closed without its shell's exit")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_urls_follow_the_api_address() {
        assert_eq!(
            socket_url("http://127.0.0.1:8080/api/v1", "/api/v1/computers/x/pty/1/stream").unwrap(),
            "ws://127.0.0.1:8080/api/v1/computers/x/pty/1/stream"
        );
        assert_eq!(
            socket_url("https://h.example/api/v1", "/api/v1/a").unwrap(),
            "wss://h.example/api/v1/a"
        );
        assert!(socket_url("ftp://h/api/v1", "/api/v1/a").is_err());
    }
}
