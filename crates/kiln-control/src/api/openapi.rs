//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations and the
//! wire types' `ToSchema` derives. `docs/specs/api/openapi.yaml` is this document; a test fails
//! when they differ (`KILN_BLESS=1` rewrites the file).

use serde_json::{json, Value};
use utoipa::OpenApi;

use super::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kiln control-plane API",
        version = "1",
        description = "Authenticated with `Authorization: Bearer kiln_...`; each operation names \
            the scope it needs. Errors are `application/problem+json` with a stable `code`. Every \
            response carries `x-request-id`. Lists take `?limit=&cursor=` and answer \
            `{items, next_cursor}`. A POST with `Idempotency-Key` is answered once and replayed \
            for 24 hours. Times are Unix milliseconds, memory MiB, CPU millicpu. Prose: \
            docs/specs/api/http-api.md."
    ),
    servers((url = "http://127.0.0.1:4280", description = "kilnd dev default")),
    paths(
        healthz,
        crate::tokens_api::whoami,
        crate::tokens_api::list_tokens,
        crate::tokens_api::create_token,
        crate::tokens_api::revoke_token,
        crate::device::device_code,
        crate::device::device_token,
        crate::device::device_page,
        crate::device::device_submit,
        list_apps,
        create_app,
        get_app,
        destroy_app,
        app_status,
        list_releases,
        create_release,
        get_release,
        list_instances,
        list_hosts,
        register_host,
        assignments,
        report_instance,
        ship_logs,
        app_logs,
        app_exec,
        exec_requests,
        host_exec,
        routes,
        list_events,
        crate::ips::list,
        crate::ips::allocate,
        crate::ips::release,
        crate::hosts::heartbeat,
        crate::hosts::drain,
        crate::hosts::undrain,
        rollback,
        scale,
        explain_placement,
        crate::quotas::own_quotas,
        crate::quotas::org_quotas,
        crate::quotas::set_org_quotas,
        crate::secrets_api::list,
        crate::secrets_api::set,
        crate::secrets_api::unset,
        crate::secrets_api::render,
        crate::secrets_api::instance_file,
        list_domains,
        add_domain,
        get_domain,
        verify_domain,
        remove_domain,
    ),
    components(schemas(Problem))
)]
struct ApiDoc;

/// The API's OpenAPI document, with the conventions every operation shares (the problem
/// response, the bearer scheme) filled in.
pub fn openapi_document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
    let problem = json!({
        "description": "An error: `application/problem+json` with a stable `code` \
            (docs/specs/api/http-api.md). 429 `rate_limited` carries `Retry-After`.",
        "headers": {
            "x-request-id": {"description": "The request's id", "schema": {"type": "string"}},
            "retry-after": {"description": "Seconds to wait (429 only)", "schema": {"type": "integer"}}
        },
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    });
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut() {
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for op in ops.values_mut() {
                // Optional headers are absent or a string, never null.
                for param in op
                    .get_mut("parameters")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "header")
                {
                    param["schema"] = if param["name"] == "Idempotency-Key" {
                        json!({"type": "string", "minLength": 1, "maxLength": 255,
                            "pattern": "^[!-~]+$"})
                    } else {
                        json!({"type": "string"})
                    };
                }
                if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) {
                    responses.insert(
                        "default".into(),
                        json!({"$ref": "#/components/responses/Problem"}),
                    );
                }
            }
        }
    }
    if let Some(components) = doc.get_mut("components").and_then(Value::as_object_mut) {
        components.insert("responses".into(), json!({ "Problem": problem }));
        components.insert(
            "securitySchemes".into(),
            json!({"bearer": {"type": "http", "scheme": "bearer",
                "description": "A `kiln_` token; the scopes an operation needs are listed in its \
                    security requirement."}}),
        );
    }
    doc
}

/// The committed form: `docs/specs/api/openapi.yaml`.
pub fn openapi_yaml() -> String {
    let body = serde_yaml::to_string(&openapi_document()).unwrap_or_default();
    format!(
        "# Status: built · Owner: api · Last reviewed: 2026-11-26\n\
         # Generated from crates/kiln-control/src/api/ by `KILN_BLESS=1 cargo nextest run -p \
         kiln-control --test openapi`; do not edit.\n{body}"
    )
}
