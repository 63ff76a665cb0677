//! The OpenAPI 3.1 document of the public API, generated from the code: every route is
//! registered together with its `#[utoipa::path]` description (`utoipa_axum::routes!`), and
//! the bodies are the `stasis_types` the handlers send, so the spec cannot drift from what is
//! served. Served at `GET /api/v1/openapi.json`.

use std::collections::BTreeMap;

use utoipa::openapi::response::{ResponseBuilder, ResponsesBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, Response};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema};

use stasis_types::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "stasis computers API",
        description = "Linux computers (real VMs) and snapshots of them while they run: the Miosa computers \
                       API. Authenticate with `Authorization: Bearer <api key>`; event streams also accept \
                       a one-use `?ticket=` from `POST /sse/ticket`. Every answer carries `x-request-id`; \
                       errors are `{\"error\": {\"code\", \"message\", \"request_id\"}}`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "computers", description = "Computer lifecycle and commands"),
        (name = "snapshots", description = "Snapshots of running computers, restores and clones"),
        (name = "meta", description = "Health and this document")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (`stasis keys create`, or the one `stasis serve` prints)",
                    ))
                    .build(),
            ),
        );
    }
}

fn error(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(ErrorBody::schema())).build(),
        )
        .into()
}

/// The error answers any authenticated call can give.
pub struct Errors;

impl IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        ResponsesBuilder::new()
            .response("401", error("Missing or invalid API key"))
            .response("404", error("Not found (`computer not found`, `snapshot not found`)"))
            .response(
                "429",
                error("Too many requests for this tenant; `Retry-After` says when to try again"),
            )
            .build()
            .into()
    }
}

/// The error answers of reads of a running computer's insides (its files, logs, metrics):
/// also a query that is wrong, a computer not running, its guest not answering.
pub struct ReadErrors;

impl IntoResponses for ReadErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut r = Errors::responses();
        r.insert("400".into(), error("The request cannot be read"));
        r.insert("403".into(), error("Permission denied in the guest"));
        r.insert(
            "409".into(),
            error("Not possible in the current state, or the path is not what the call needs"),
        );
        r.insert("422".into(), error("A query or path is not valid (`field` names it)"));
        r.insert("503".into(), error("The computer's guest agent is not answering"));
        r.insert("507".into(), error("The computer's disk is full"));
        r
    }
}

/// The error answers of calls that take a JSON body or change state.
pub struct WriteErrors;

impl IntoResponses for WriteErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut r = Errors::responses();
        r.insert("400".into(), error("The body is not a JSON object"));
        r.insert(
            "409".into(),
            error("Not possible in the current state (the message says why)"),
        );
        r.insert(
            "403".into(),
            error("A quota is exceeded (`quota_exceeded`, the message names it)"),
        );
        r.insert("413".into(), error("The body is larger than 1 MiB"));
        r.insert(
            "422".into(),
            error("A field is missing, of the wrong type or out of range (`field` names it)"),
        );
        r
    }
}

/// The error answers of calls that change files in a running computer.
pub struct FileWriteErrors;

impl IntoResponses for FileWriteErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut r = WriteErrors::responses();
        r.extend(ReadErrors::responses());
        r.insert("408".into(), error("The upload stopped arriving"));
        r
    }
}
