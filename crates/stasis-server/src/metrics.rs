//! A computer's metrics, as the official SDK reads them (`computer.metrics(window="1h")`):
//! CPU and memory from the host's side (its QEMU's CPU time and resident memory, as the
//! host's kernel counts them, sampled every 2 s while it runs, an hour kept), and memory,
//! disk and network from the guest's side (its own kernel's counters, read when asked).

use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stasis_types::ComputerId;
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::auth::Tenant;
use crate::computers::Run;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoints, IfLost, Runs};
use crate::error::Error;
use crate::http_error::ApiResult;
use crate::openapi::ReadErrors;
use crate::AppState;

/// The longest window; samples are kept an hour.
const MAX_WINDOW_SECS: u64 = 24 * 3600;

pub fn router() -> Endpoints {
    Endpoints::new().add(Runs::OnOwner(IfLost::Unavailable), routes!(get_metrics))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CpuMetrics {
    /// Over the last samples (about 10 s), of all its vCPUs: 100 is all of them busy.
    pub percent: f64,
    /// Over the whole window.
    pub average_percent: f64,
    pub vcpus: u32,
    /// CPU time its QEMU has used since it started (under TCG this counts the emulation too).
    pub seconds_total: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemoryMetrics {
    /// In use in the guest (total less available), bytes.
    pub used_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub percent: Option<f64>,
    /// What its QEMU holds in the host's memory.
    pub host_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiskMetrics {
    /// Of the guest's root file system.
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetworkMetrics {
    /// Bytes through the guest's `eth0` since it started.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One sample in the window.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MetricsSample {
    pub at: DateTime<Utc>,
    /// Since the sample before.
    pub cpu_percent: f64,
    pub host_rss_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Metrics {
    pub computer_id: ComputerId,
    pub window: String,
    pub at: DateTime<Utc>,
    pub cpu: CpuMetrics,
    pub memory: MemoryMetrics,
    /// None if the guest did not answer.
    pub disk: Option<DiskMetrics>,
    /// None without a network card, or if the guest did not answer.
    pub network: Option<NetworkMetrics>,
    pub samples: Vec<MetricsSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MetricsEnvelope {
    pub data: Metrics,
}

#[derive(Debug, Deserialize)]
pub struct MetricsQuery {
    pub window: Option<String>,
}

/// `30s`, `5m`, `1h` (a number and a unit; a bare number is seconds), up to a day.
fn window_secs(raw: &str) -> Result<u64, Error> {
    let raw = raw.trim();
    let (digits, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = digits.parse().ok().filter(|n| *n > 0).ok_or_else(|| bad_window(raw))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(bad_window(raw)),
    };
    if secs > MAX_WINDOW_SECS {
        return Err(bad_window(raw));
    }
    Ok(secs)
}

fn bad_window(raw: &str) -> Error {
    Error::invalid(
        "window",
        format!("{raw:?} is not a window like 30s, 5m or 1h (at most 24h; samples are kept an hour)"),
    )
}

/// CPU percent of `vcpus` between two samples.
fn percent_between(a: &stasis_vmm::vm::Sample, b: &stasis_vmm::vm::Sample, vcpus: u32) -> f64 {
    let wall = b.at.duration_since(a.at).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    if wall <= 0.0 {
        return 0.0;
    }
    ((b.cpu_secs - a.cpu_secs) / wall / f64::from(vcpus.max(1)) * 100.0).clamp(0.0, 100.0)
}

/// What the guest's kernel says of its memory, root file system and `eth0`.
struct GuestView {
    mem_total: Option<u64>,
    mem_available: Option<u64>,
    disk: Option<DiskMetrics>,
    network: Option<NetworkMetrics>,
}

fn parse_guest(text: &str) -> GuestView {
    let mut parts = text.split("\n--\n");
    let meminfo = parts.next().unwrap_or("");
    let df = parts.next().unwrap_or("");
    let netdev = parts.next().unwrap_or("");
    let kib = |key: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    // `df -P -B1 /`: a header, then `fs size used available percent mount`.
    let disk = df.lines().nth(1).and_then(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let total: u64 = f.get(1)?.parse().ok()?;
        let used: u64 = f.get(2)?.parse().ok()?;
        Some(DiskMetrics {
            used_bytes: used,
            total_bytes: total,
            percent: if total > 0 {
                used as f64 * 100.0 / total as f64
            } else {
                0.0
            },
        })
    });
    let network = netdev.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != "eth0" {
            return None;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(NetworkMetrics {
            rx_bytes: f.first()?.parse().ok()?,
            tx_bytes: f.get(8)?.parse().ok()?,
        })
    });
    GuestView {
        mem_total: kib("MemTotal:"),
        mem_available: kib("MemAvailable:"),
        disk,
        network,
    }
}

/// The computer's CPU, memory, disk and network, and its samples over `window` (default 1h).
#[utoipa::path(get, path = "/computers/{id}/metrics", operation_id = "getMetrics", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"),
        ("window" = Option<String>, Query, description = "How far back: 30s, 5m, 1h (default 1h)")),
    responses((status = 200, description = "The metrics", body = MetricsEnvelope), ReadErrors))]
async fn get_metrics(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    crate::body::Query(q): crate::body::Query<MetricsQuery>,
) -> ApiResult<Json<MetricsEnvelope>> {
    let window = q.window.unwrap_or_else(|| "1h".into());
    let secs = window_secs(&window)?;
    let id = computer_id(&id)?;
    let computer = state.computers.get(tenant, id).await?;
    let vm = state.computers.running_vm(tenant, id).await?;
    let vcpus = computer.size.vcpus();
    vm.sample();
    let since = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
    let taken = vm.samples_since(since);
    let samples: Vec<MetricsSample> = taken
        .windows(2)
        .map(|w| MetricsSample {
            at: DateTime::<Utc>::from(w[1].at),
            cpu_percent: percent_between(&w[0], &w[1], vcpus),
            host_rss_bytes: w[1].rss_bytes,
        })
        .collect();
    let recent = &taken[taken.len().saturating_sub(6)..];
    let cpu = CpuMetrics {
        percent: match (recent.first(), recent.last()) {
            (Some(a), Some(b)) => percent_between(a, b, vcpus),
            _ => 0.0,
        },
        average_percent: match (taken.first(), taken.last()) {
            (Some(a), Some(b)) => percent_between(a, b, vcpus),
            _ => 0.0,
        },
        vcpus,
        seconds_total: taken.last().map_or(0.0, |s| s.cpu_secs),
    };
    let guest = state
        .computers
        .exec(
            tenant,
            id,
            Run::new(
                "/bin/sh",
                vec![
                    "-c".into(),
                    "cat /proc/meminfo; echo --; df -P -B1 /; echo --; cat /proc/net/dev".into(),
                ],
                10,
            ),
        )
        .await
        .ok()
        .filter(|r| r.exit_code == 0)
        .map(|r| parse_guest(&r.output));
    let (mem_total, mem_available) = guest.as_ref().map_or((None, None), |g| (g.mem_total, g.mem_available));
    let used = mem_total.zip(mem_available).map(|(t, a)| t.saturating_sub(a));
    let memory = MemoryMetrics {
        used_bytes: used,
        total_bytes: mem_total,
        percent: used
            .zip(mem_total)
            .map(|(u, t)| if t > 0 { u as f64 * 100.0 / t as f64 } else { 0.0 }),
        host_rss_bytes: taken.last().map(|s| s.rss_bytes),
    };
    let (disk, network) = match guest {
        Some(g) => (g.disk, g.network.filter(|_| computer.network)),
        None => (None, None),
    };
    Ok(Json(MetricsEnvelope {
        data: Metrics {
            computer_id: id,
            window,
            at: Utc::now(),
            cpu,
            memory,
            disk,
            network,
            samples,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_the_guests_counters_are_read() {
        assert_eq!(window_secs("1h").unwrap(), 3600);
        assert_eq!(window_secs("90").unwrap(), 90);
        assert_eq!(window_secs("5m").unwrap(), 300);
        for bad in ["", "0s", "1w", "h", "25h", "-1m"] {
            assert!(window_secs(bad).is_err(), "{bad:?}");
        }
        let text = "MemTotal:         490000 kB\nMemFree: 1 kB\nMemAvailable:     290000 kB\n--\n\
                    Filesystem 1-blocks Used Available Capacity Mounted on\n/dev/vda 2000 500 1500 25% /\n--\n\
                    Inter-|   Receive | Transmit\n face |bytes packets\n    lo: 10 1 0 0 0 0 0 0 10 1 0 0 0 0 0 0\n  \
                    eth0: 1234 5 0 0 0 0 0 0 5678 6 0 0 0 0 0 0\n";
        let g = parse_guest(text);
        assert_eq!(
            (g.mem_total, g.mem_available),
            (Some(490000 * 1024), Some(290000 * 1024))
        );
        let d = g.disk.unwrap();
        assert_eq!((d.used_bytes, d.total_bytes, d.percent), (500, 2000, 25.0));
        let n = g.network.unwrap();
        assert_eq!((n.rx_bytes, n.tx_bytes), (1234, 5678));
        let t0 = std::time::SystemTime::UNIX_EPOCH;
        let a = stasis_vmm::vm::Sample {
            at: t0,
            cpu_secs: 1.0,
            rss_bytes: 0,
        };
        let b = stasis_vmm::vm::Sample {
            at: t0 + std::time::Duration::from_secs(2),
            cpu_secs: 2.0,
            rss_bytes: 0,
        };
        assert_eq!(percent_between(&a, &b, 1), 50.0);
        assert_eq!(percent_between(&a, &b, 2), 25.0);
    }
}
