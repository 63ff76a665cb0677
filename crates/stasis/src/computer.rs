//! `stasis computer ...`: create, list, inspect, run commands in, start, stop, clone and
//! delete computers through the API.

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
        ComputerCommand::Delete { id } => {
            let v = api.call(Method::DELETE, &format!("/computers/{id}"), None).await?;
            print(out, &v, || v["message"].as_str().unwrap_or("").to_string());
        }
    }
    Ok(())
}
