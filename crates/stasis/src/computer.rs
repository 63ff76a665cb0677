//! `stasis computer ...`: create, list, inspect, run commands in, copy files into and out of,
//! set the variables of, start, stop, clone and delete computers through the API.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use stasis_types::{Computer, ComputerList, ExecResponse};

use crate::client::{print, row, Api, Connection, ExitCode, Output};

#[derive(Subcommand)]
pub enum ComputerCommand {
    /// Create a computer.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "small")]
        size: String,
        /// Wait until it is running.
        #[arg(long)]
        wait: bool,
    },
    List,
    Get {
        id: String,
    },
    /// Run a command under bash in the computer; exits with the command's exit code.
    Exec {
        id: String,
        /// Seconds before the command is killed (exit code 124).
        #[arg(long)]
        timeout: Option<u64>,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    Start {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    Stop {
        id: String,
    },
    /// Hibernate: a snapshot and a stop in one step, keeping its memory (it holds none on its
    /// host while paused); `resume` brings it back in place, processes still running.
    Pause {
        id: String,
    },
    /// Bring a paused computer back in place.
    Resume {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// A new computer from a fresh snapshot of this one (same as `stasis clone`).
    Clone {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Wait until the clone is running.
        #[arg(long)]
        wait: bool,
    },
    #[command(alias = "destroy")]
    Delete {
        id: String,
    },
    /// Copy a file into or out of a computer: `cp ./file ID:/path` or `cp ID:/path ./file`
    /// (streamed, with a progress bar on a terminal).
    Cp {
        from: String,
        to: String,
    },
    /// A computer's console since it last started: its last lines, or followed as printed.
    Logs {
        id: String,
        /// How many of the last lines.
        #[arg(long, short = 'n', default_value_t = 200)]
        lines: usize,
        /// Keep printing lines as the computer prints them (Ctrl-C ends).
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// An interactive terminal in a running computer (a login shell); exits with its code.
    Shell {
        id: String,
    },
    /// A computer's environment variables (every exec sees them): listed, or set and unset.
    Env {
        id: String,
        /// NAME=VALUE to set (added or replaced); may be repeated.
        #[arg(long)]
        set: Vec<String>,
        /// NAME to remove; may be repeated.
        #[arg(long)]
        unset: Vec<String>,
    },
}

pub async fn run(conn: Connection, command: ComputerCommand) -> Result<()> {
    let api = Api::new(&conn)?;
    let out = conn.output;
    use reqwest::Method;
    match command {
        ComputerCommand::Clone { id, name, wait } => {
            crate::snapshot::clone(&api, out, &id, name, wait).await?;
        }
        ComputerCommand::Create { name, size, wait } => {
            let v = api
                .call(Method::POST, "/computers", Some(json!({"name": name, "size": size})))
                .await?;
            let mut c: Computer = serde_json::from_value(v)?;
            if wait {
                c = api.wait_running(&c.id.to_string(), Duration::from_secs(300)).await?;
            }
            print(out, &serde_json::to_value(&c)?, || row(&c));
        }
        ComputerCommand::List => {
            let v = api.call(Method::GET, "/computers", None).await?;
            let list: ComputerList = serde_json::from_value(v.clone())?;
            print(out, &v, || {
                list.computers.iter().map(row).collect::<Vec<_>>().join("\n")
            });
        }
        ComputerCommand::Get { id } => {
            let c = api.get_computer(&id).await?;
            print(out, &serde_json::to_value(&c)?, || {
                let mut s = row(&c);
                if let Some(e) = &c.error {
                    s.push_str(&format!("\nerror: {e}"));
                }
                s
            });
        }
        ComputerCommand::Exec { id, timeout, command } => {
            let mut body = json!({"command": command.join(" ")});
            if let Some(t) = timeout {
                body["timeout"] = json!(t);
            }
            let v = api
                .call(Method::POST, &format!("/computers/{id}/exec"), Some(body))
                .await?;
            let r: ExecResponse = serde_json::from_value(v.clone())?;
            match out {
                Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                Output::Text => {
                    print!("{}", r.output);
                    eprint!("{}", r.stderr);
                }
            }
            if r.exit_code != 0 {
                return Err(ExitCode(r.exit_code.clamp(1, 255)).into());
            }
        }
        ComputerCommand::Start { id, wait } => {
            let v = api.call(Method::POST, &format!("/computers/{id}/start"), None).await?;
            if wait {
                let c = api.wait_running(&id, Duration::from_secs(300)).await?;
                print(out, &serde_json::to_value(&c)?, || row(&c));
            } else {
                print(out, &v, || v["message"].as_str().unwrap_or("").to_string());
            }
        }
        ComputerCommand::Stop { id } => {
            let v = api.call(Method::POST, &format!("/computers/{id}/stop"), None).await?;
            print(out, &v, || v["message"].as_str().unwrap_or("").to_string());
        }
        ComputerCommand::Pause { id } => {
            let v = api.call(Method::POST, &format!("/computers/{id}/pause"), None).await?;
            print(out, &v, || v["message"].as_str().unwrap_or("").to_string());
        }
        ComputerCommand::Resume { id, wait } => {
            let v = api.call(Method::POST, &format!("/computers/{id}/resume"), None).await?;
            if wait {
                let c = api.wait_running(&id, Duration::from_secs(300)).await?;
                print(out, &serde_json::to_value(&c)?, || row(&c));
            } else {
                print(out, &v, || v["message"].as_str().unwrap_or("").to_string());
            }
        }
        ComputerCommand::Delete { id } => {
            let v = api.call(Method::DELETE, &format!("/computers/{id}"), None).await?;
            print(out, &v, || v["message"].as_str().unwrap_or("").to_string());
        }
        ComputerCommand::Shell { id } => crate::shell::shell(&api, &id).await?,
        ComputerCommand::Cp { from, to } => {
            let v = match (remote(&from), remote(&to)) {
                (None, Some((id, path))) => upload(&api, &from, id, path).await?,
                (Some((id, path)), None) => download(&api, id, path, &to).await?,
                _ => anyhow::bail!("one side of cp is a computer's path (ID:/path) and the other a local file"),
            };
            print(out, &v, || v["message"].as_str().unwrap_or("").to_string());
        }
        ComputerCommand::Logs { id, lines, follow } => {
            let path = format!("/computers/{id}/logs?lines={lines}");
            let v = api.call(Method::GET, &path, None).await?;
            let page = &v["data"];
            let empty = Vec::new();
            let shown = page["lines"].as_array().unwrap_or(&empty);
            if out == Output::Json && !follow {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for line in shown {
                    println!("{}", line["text"].as_str().unwrap_or(""));
                }
            }
            if follow {
                let since = page["cursor"].as_u64().unwrap_or(0);
                follow_logs(&api, &id, since).await?;
            }
        }
        ComputerCommand::Env { id, set, unset } => {
            let base = format!("/computers/{id}/env");
            for pair in &set {
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--set takes NAME=VALUE, not {pair:?}"))?;
                let existing = api.call(Method::GET, &base, None).await?;
                let has = existing["data"]
                    .as_array()
                    .is_some_and(|vars| vars.iter().any(|v| v["name"] == name));
                if has {
                    let path = format!("{base}/{name}");
                    api.call(Method::PATCH, &path, Some(json!({"value": value}))).await?;
                } else {
                    api.call(Method::POST, &base, Some(json!({"name": name, "value": value})))
                        .await?;
                }
            }
            for name in &unset {
                api.call(Method::DELETE, &format!("{base}/{name}"), None).await?;
            }
            let v = api.call(Method::GET, &base, None).await?;
            print(out, &v, || {
                v["data"]
                    .as_array()
                    .map(|vars| {
                        vars.iter()
                            .map(|v| {
                                format!(
                                    "{}={}",
                                    v["name"].as_str().unwrap_or(""),
                                    v["value"].as_str().unwrap_or("")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                    .unwrap_or_default()
            });
        }
    }
    Ok(())
}

/// Prints the computer's console lines from `since` as they come (the SSE stream).
async fn follow_logs(api: &Api, id: &str, since: u64) -> Result<()> {
    use futures::StreamExt;
    let req = api
        .request(reqwest::Method::GET, &format!("/computers/{id}/logs/stream"))
        .query(&[("since", since)])
        .header("accept", "text/event-stream");
    let resp = api.send(req, &format!("the logs of {id}")).await?;
    let mut body = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    while let Some(piece) = body.next().await {
        pending.extend_from_slice(&piece?);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if line.is_empty() {
                if event == "log" {
                    let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                    println!("{}", v["text"].as_str().unwrap_or(""));
                } else if event == "gap" {
                    eprintln!("(lines were cut away before they could be shown)");
                }
                event.clear();
                data.clear();
            } else if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            }
        }
    }
    Ok(())
}

/// `ID:/path` as (ID, /path); a local path otherwise.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

/// A bar with bytes, rate and ETA on a terminal's stderr; nothing otherwise.
fn bar(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total.unwrap_or(0));
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

async fn upload(api: &Api, local: &str, id: &str, path: &str) -> Result<serde_json::Value> {
    use tokio::io::AsyncReadExt;
    let file = tokio::fs::File::open(local)
        .await
        .map_err(|e| anyhow::anyhow!("opening {local}: {e}"))?;
    let size = file.metadata().await?.len();
    let progress = bar(Some(size), "uploading");
    let boundary = format!("stasis-cp-{:016x}", rand::random::<u64>());
    let name = std::path::Path::new(local)
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', ""))
        .unwrap_or_else(|| "file".into());
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let shown = progress.clone();
    let pieces = futures::stream::unfold(Some(file), move |file| {
        let shown = shown.clone();
        async move {
            let mut file = file?;
            let mut buf = vec![0u8; 256 * 1024];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    shown.inc(n as u64);
                    Some((Ok::<_, std::io::Error>(buf), Some(file)))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    use futures::StreamExt;
    let body = futures::stream::once(std::future::ready(Ok(head.into_bytes())))
        .chain(pieces)
        .chain(futures::stream::once(std::future::ready(Ok(tail.into_bytes()))));
    let req = api
        .request(reqwest::Method::POST, &format!("/computers/{id}/files/upload"))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(reqwest::Body::wrap_stream(body));
    let resp = api.send(req, &format!("upload to {id}:{path}")).await;
    progress.finish_and_clear();
    Ok(resp?.json().await?)
}

async fn download(api: &Api, id: &str, path: &str, local: &str) -> Result<serde_json::Value> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let req = api
        .request(reqwest::Method::GET, &format!("/computers/{id}/files/download"))
        .query(&[("path", path)]);
    let resp = api.send(req, &format!("download of {id}:{path}")).await?;
    let progress = bar(resp.content_length(), "downloading");
    // Beside the destination, renamed over it once complete.
    let partial = format!("{local}.stasis-partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| anyhow::anyhow!("creating {partial}: {e}"))?;
    let mut body = resp.bytes_stream();
    let mut n = 0u64;
    let copied: Result<()> = async {
        while let Some(piece) = body.next().await {
            let piece = piece?;
            file.write_all(&piece).await?;
            n += piece.len() as u64;
            progress.set_position(n);
        }
        file.flush().await?;
        Ok(())
    }
    .await;
    progress.finish_and_clear();
    if let Err(e) = copied {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e.context(format!("downloading {id}:{path}")));
    }
    tokio::fs::rename(&partial, local).await?;
    Ok(json!({"success": true, "bytes": n, "message": format!("downloaded {n} bytes to {local}")}))
}
