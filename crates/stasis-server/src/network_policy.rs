//! A computer's own egress policy, as the official SDK calls it (`computer.network_policy`:
//! `GET/PUT/DELETE /computers/{id}/network-policy`). Its rules are enforced by the host's
//! kernel, in the platform's nftables table, on the computer's veth: they narrow the
//! platform's policy (`--egress-allow/--egress-deny` and the default refusals) and never
//! widen it. A write takes effect at once on a running computer (for new connections), and
//! at every start, restore and re-attach after; clones and restores inherit their source's.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use stasis_types::{NetworkPolicy, NetworkPolicyRule, PolicyEffect, PolicyProtocol, SetNetworkPolicyRequest};
use stasis_vmm::network::{Cidr, ComputerPolicy, PolicyRule, Protocol};
use utoipa_axum::routes;

use crate::auth::Tenant;
use crate::body;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoints, IfLost, Runs};
use crate::error::{Conflict, Error};
use crate::http_error::ApiResult;
use crate::openapi::{Errors, WriteErrors};
use crate::AppState;

/// At most this many rules a computer.
pub const MAX_RULES: usize = 256;

/// Reading is metadata; a write runs where the computer does, which enforces it (a lost
/// host's computer gets it stored, and applied when its host is back).
pub fn router() -> Endpoints {
    Endpoints::new()
        .add(Runs::Anywhere, routes!(get_policy))
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(set_policy))
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(reset_policy))
}

/// A stored policy as the host's kernel enforces it; a rule that cannot be names its field.
pub fn compile(p: &NetworkPolicy) -> Result<ComputerPolicy, Error> {
    if p.rules.len() > MAX_RULES {
        return Err(Error::invalid(
            "rules",
            format!("a policy holds at most {MAX_RULES} rules, not {}", p.rules.len()),
        ));
    }
    let rules = p
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| compile_rule(i, r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ComputerPolicy {
        rules,
        default_allow: p.default_effect == PolicyEffect::Allow,
    })
}

fn compile_rule(i: usize, r: &NetworkPolicyRule) -> Result<PolicyRule, Error> {
    let raw = r.destination.trim();
    let destination: Cidr = raw.parse().map_err(|_| {
        Error::invalid(
            &format!("rules[{i}].destination"),
            format!(
                "{raw:?} is not an IPv4 address or network (like 10.0.0.0/8); names are not taken, \
                 since a rule is enforced by address"
            ),
        )
    })?;
    let protocol = match r.protocol.unwrap_or_default() {
        PolicyProtocol::Tcp => Some(Protocol::Tcp),
        PolicyProtocol::Udp => Some(Protocol::Udp),
        PolicyProtocol::Any => None,
    };
    let ports = match r.ports.as_deref().map(str::trim).filter(|p| !p.is_empty()) {
        None => Vec::new(),
        Some(list) => parse_ports(list).ok_or_else(|| {
            Error::invalid(
                &format!("rules[{i}].ports"),
                format!("{list:?} is not a port list: ports 1 to 65535, like 443, 80,443 or 8000-8100"),
            )
        })?,
    };
    Ok(PolicyRule {
        allow: r.effect == PolicyEffect::Allow,
        destination,
        protocol,
        ports,
    })
}

/// `443`, `80,443`, `8000-8100`, `22, 8000-8100`: inclusive ranges, each from 1 to 65535.
fn parse_ports(list: &str) -> Option<Vec<(u16, u16)>> {
    let one = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p > 0);
    let ranges: Option<Vec<(u16, u16)>> = list
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => Some((one(a)?, one(b)?)).filter(|(a, b)| a <= b),
            None => one(part).map(|p| (p, p)),
        })
        .collect();
    let mut ranges = ranges.filter(|r| !r.is_empty() && r.len() <= 64)?;
    // Overlapping or touching ranges as one (nftables refuses overlapping set elements).
    ranges.sort();
    let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    Some(merged)
}

fn default_policy(c: &stasis_types::Computer) -> NetworkPolicy {
    NetworkPolicy {
        computer_id: c.id,
        tenant_id: c.tenant_id,
        rules: Vec::new(),
        default_effect: PolicyEffect::Allow,
        inserted_at: None,
        updated_at: None,
    }
}

/// The computer's egress policy (with none of its own: no rules, `allow`, so everything the
/// platform allows).
#[utoipa::path(get, path = "/computers/{id}/network-policy", operation_id = "getNetworkPolicy", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The policy", body = NetworkPolicy), Errors))]
async fn get_policy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<NetworkPolicy>> {
    let c = state.computers.get(tenant, computer_id(&id)?).await?;
    let stored = state.db.network_policy(c.id).await?;
    Ok(Json(stored.unwrap_or_else(|| default_policy(&c))))
}

/// Set the computer's egress policy, replacing the one before: rules in order (the first
/// that matches decides), then `default_effect` (default `allow`). Destinations are IPv4
/// addresses or networks. It narrows what the platform allows, never widens it, and holds
/// for new connections at once.
#[utoipa::path(put, path = "/computers/{id}/network-policy", operation_id = "setNetworkPolicy", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = SetNetworkPolicyRequest,
    responses((status = 200, description = "The policy, as stored and enforced", body = NetworkPolicy), WriteErrors))]
async fn set_policy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<SetNetworkPolicyRequest>,
) -> ApiResult<Json<NetworkPolicy>> {
    let c = state.computers.get(tenant, computer_id(&id)?).await?;
    let policy = NetworkPolicy {
        rules: req.rules,
        default_effect: req.default_effect.unwrap_or_default(),
        ..default_policy(&c)
    };
    compile(&policy)?;
    enforcing(&state)?;
    let stored = state.db.put_network_policy(&policy).await?;
    if state.control_plane.is_none() {
        state.computers.enforce_policy(c.id).await?;
    }
    Ok(Json(stored))
}

/// Back to the default policy (everything the platform allows). Idempotent.
#[utoipa::path(delete, path = "/computers/{id}/network-policy", operation_id = "resetNetworkPolicy", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 204, description = "Reset"), WriteErrors))]
async fn reset_policy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let c = state.computers.get(tenant, computer_id(&id)?).await?;
    state.db.delete_network_policy(c.id).await?;
    if state.control_plane.is_none() {
        state.computers.enforce_policy(c.id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A process that runs computers must be able to enforce a policy (a control plane stores it
/// for the host, which applies it when the computer starts there).
fn enforcing(state: &AppState) -> Result<(), Error> {
    if state.control_plane.is_some() || state.computers.has_networks() {
        return Ok(());
    }
    Err(Error::conflict(
        Conflict::NoEgressPolicy,
        "this platform's computers run on QEMU's user networking (it is not root, or runs with \
         --confine off), which no egress policy governs; a policy needs the platform's own networks",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_destinations_are_read_or_refused_by_name() {
        assert_eq!(parse_ports("443"), Some(vec![(443, 443)]));
        assert_eq!(
            parse_ports("80, 443,8000-8100"),
            Some(vec![(80, 80), (443, 443), (8000, 8100)])
        );
        assert_eq!(parse_ports("90-95,80-91,96,443,443"), Some(vec![(80, 96), (443, 443)]));
        for bad in ["0", "65536", "9-1", "a", "80,", "-5", "1-2-3"] {
            assert_eq!(parse_ports(bad), None, "{bad}");
        }
        let rule = |destination: &str, ports: Option<&str>| NetworkPolicyRule {
            effect: PolicyEffect::Deny,
            destination: destination.into(),
            ports: ports.map(str::to_string),
            protocol: None,
        };
        let mut p = NetworkPolicy {
            computer_id: stasis_types::ComputerId::new(),
            tenant_id: stasis_types::TenantId::new(),
            rules: vec![rule("10.1.2.3", Some("22")), rule("192.168.0.0/16", None)],
            default_effect: PolicyEffect::Deny,
            inserted_at: None,
            updated_at: None,
        };
        let c = compile(&p).unwrap();
        assert!(!c.default_allow && c.rules.len() == 2 && !c.rules[0].allow);
        assert_eq!(c.rules[0].ports, vec![(22, 22)]);
        let field = |p: &NetworkPolicy| match compile(p) {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        p.rules.push(rule("example.com", None));
        assert_eq!(field(&p), "rules[2].destination");
        p.rules[2] = rule("10.0.0.1", Some("x"));
        assert_eq!(field(&p), "rules[2].ports");
    }
}
