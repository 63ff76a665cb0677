//! A computer's environment variables, as the official SDK calls them (`computer.env`:
//! `GET/POST /computers/{id}/env`, `PATCH/DELETE /computers/{id}/env/{name}`; and the `env`
//! of `create` and `start`). Every exec in the computer runs with them on top of the agent's
//! defaults (so a variable may replace `PATH`). They are the platform's, not the guest's:
//! stored with the computer, kept across stop and start, copied into each snapshot as they
//! are when it is taken, and given back to every restore and clone of it. Values are never
//! logged.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use stasis_types::{ComputerId, EnvEnvelope, EnvList, SetEnvRequest, UpdateEnvRequest};
use utoipa_axum::routes;

use crate::auth::Tenant;
use crate::body;
use crate::db::Db;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoints, IfLost, Runs};
use crate::error::{Conflict, Error, Resource};
use crate::http_error::ApiResult;
use crate::openapi::{Errors, WriteErrors};
use crate::AppState;

/// At most this many variables a computer.
pub const MAX_VARS: usize = 128;
/// Longest name.
pub const MAX_NAME: usize = 128;
/// Longest value.
pub const MAX_VALUE: usize = 32 * 1024;
/// Most bytes of names and values together, a computer.
pub const MAX_TOTAL: usize = 256 * 1024;

/// Reads are metadata; writes run where the computer does, as its other changes do (a lost
/// host's computer gets them stored).
pub fn router() -> Endpoints {
    Endpoints::new()
        .add(Runs::Anywhere, routes!(list_env))
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(add_env))
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(update_env))
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(delete_env))
}

/// A name a shell can use: letters, digits and `_`, not starting with a digit.
fn check_name(field: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        return Ok(());
    }
    Err(Error::invalid(
        field,
        format!(
            "{name:?} is not a variable name: 1 to {MAX_NAME} letters, digits and underscores, \
             not starting with a digit"
        ),
    ))
}

fn check_value(field: &str, value: &str) -> Result<(), Error> {
    if value.len() > MAX_VALUE {
        return Err(Error::invalid(
            field,
            format!("a value is at most {MAX_VALUE} bytes, not {}", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(Error::invalid(field, "a value cannot hold a NUL character"));
    }
    Ok(())
}

/// Checks the variables a create or start sets (`field` is where they are in its body).
pub fn validate(field: &str, vars: Option<BTreeMap<String, String>>) -> Result<Vec<(String, String)>, Error> {
    let vars: Vec<(String, String)> = vars.unwrap_or_default().into_iter().collect();
    for (name, value) in &vars {
        check_name(&format!("{field}.{name}"), name)?;
        check_value(&format!("{field}.{name}"), value)?;
    }
    check_totals(field, vars.iter().map(|(n, v)| (n.as_str(), v.as_str())))?;
    Ok(vars)
}

fn check_totals<'a>(field: &str, all: impl Iterator<Item = (&'a str, &'a str)>) -> Result<(), Error> {
    let (count, bytes) = all.fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len()));
    if count > MAX_VARS {
        return Err(Error::invalid(
            field,
            format!("a computer has at most {MAX_VARS} variables, not {count}"),
        ));
    }
    if bytes > MAX_TOTAL {
        return Err(Error::invalid(
            field,
            format!("a computer's variables take at most {MAX_TOTAL} bytes together, not {bytes}"),
        ));
    }
    Ok(())
}

/// Sets `vars` on `computer` (adding or replacing) if all of its variables then stay within
/// the limits.
pub async fn set_all(db: &Db, field: &str, computer: ComputerId, vars: &[(String, String)]) -> Result<(), Error> {
    if vars.is_empty() {
        return Ok(());
    }
    let mut merged: BTreeMap<String, String> = db
        .env_vars(computer)
        .await?
        .into_iter()
        .map(|v| (v.name, v.value))
        .collect();
    merged.extend(vars.iter().cloned());
    check_totals(field, merged.iter().map(|(n, v)| (n.as_str(), v.as_str())))?;
    db.set_env_vars(computer, vars).await?;
    Ok(())
}

/// The computer's variables, by name.
#[utoipa::path(get, path = "/computers/{id}/env", operation_id = "listEnv", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The variables", body = EnvList), Errors))]
async fn list_env(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<EnvList>> {
    let c = state.computers.get(tenant, computer_id(&id)?).await?;
    Ok(Json(EnvList {
        data: state.db.env_vars(c.id).await?,
    }))
}

/// Add a variable; every exec from now on sees it. One of the same name is a 409 (change it
/// with `PATCH`).
#[utoipa::path(post, path = "/computers/{id}/env", operation_id = "addEnv", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = SetEnvRequest,
    responses((status = 201, description = "The variable", body = EnvEnvelope), WriteErrors))]
async fn add_env(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<SetEnvRequest>,
) -> ApiResult<(StatusCode, Json<EnvEnvelope>)> {
    let c = state.computers.get(tenant, computer_id(&id)?).await?;
    check_name("name", &req.name)?;
    check_value("value", &req.value)?;
    let existing = state.db.env_vars(c.id).await?;
    check_totals(
        "name",
        existing
            .iter()
            .map(|v| (v.name.as_str(), v.value.as_str()))
            .chain(std::iter::once((req.name.as_str(), req.value.as_str()))),
    )?;
    match state.db.insert_env_var(c.id, &req.name, &req.value).await? {
        Some(var) => Ok((StatusCode::CREATED, Json(EnvEnvelope { data: var }))),
        None => Err(Error::conflict(
            Conflict::EnvVarExists,
            format!(
                "computer {} has a variable {} already; change it with PATCH /computers/{}/env/{}",
                c.id, req.name, c.id, req.name
            ),
        )
        .into()),
    }
}

/// Change a variable's value.
#[utoipa::path(patch, path = "/computers/{id}/env/{name}", operation_id = "updateEnv", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("name" = String, Path, description = "The variable's name")), request_body = UpdateEnvRequest,
    responses((status = 200, description = "The variable", body = EnvEnvelope), WriteErrors))]
async fn update_env(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, name)): Path<(String, String)>,
    body::Json(req): body::Json<UpdateEnvRequest>,
) -> ApiResult<Json<EnvEnvelope>> {
    let c = state.computers.get(tenant, computer_id(&id)?).await?;
    check_value("value", &req.value)?;
    let existing = state.db.env_vars(c.id).await?;
    check_totals(
        "value",
        existing.iter().map(|v| {
            let value = if v.name == name {
                req.value.as_str()
            } else {
                v.value.as_str()
            };
            (v.name.as_str(), value)
        }),
    )?;
    match state.db.update_env_var(c.id, &name, &req.value).await? {
        Some(var) => Ok(Json(EnvEnvelope { data: var })),
        None => Err(Error::not_found(Resource::EnvVar, &name).into()),
    }
}

/// Remove a variable.
#[utoipa::path(delete, path = "/computers/{id}/env/{name}", operation_id = "deleteEnv", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("name" = String, Path, description = "The variable's name")),
    responses((status = 204, description = "Removed"), WriteErrors))]
async fn delete_env(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let c = state.computers.get(tenant, computer_id(&id)?).await?;
    if state.db.delete_env_var(c.id, &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::not_found(Resource::EnvVar, &name).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_values_and_totals_are_checked_by_field() {
        assert!(check_name("name", "PATH").is_ok());
        assert!(check_name("name", "_x1").is_ok());
        for bad in ["", "1X", "A-B", "A B", "É", &"A".repeat(MAX_NAME + 1)] {
            let e = check_name("name", bad).unwrap_err();
            assert!(
                matches!(&e, Error::Invalid { field, .. } if field == "name"),
                "{bad:?}: {e}"
            );
        }
        assert!(check_value("value", &"v".repeat(MAX_VALUE)).is_ok());
        assert!(check_value("value", &"v".repeat(MAX_VALUE + 1)).is_err());
        assert!(check_value("value", "a\0b").is_err());

        let mut many = BTreeMap::new();
        for i in 0..=MAX_VARS {
            many.insert(format!("V{i}"), "x".into());
        }
        assert!(validate("env", Some(many)).is_err());
        let e = validate("env", Some(BTreeMap::from([("9".to_string(), "x".to_string())]))).unwrap_err();
        assert!(matches!(&e, Error::Invalid { field, .. } if field == "env.9"), "{e}");
        let big: BTreeMap<String, String> = (0..9).map(|i| (format!("B{i}"), "y".repeat(MAX_VALUE))).collect();
        assert!(validate("env", Some(big)).is_err(), "9 × 32 KiB is over the total");
        assert_eq!(validate("env", None).unwrap(), vec![]);
    }
}
