//! The dashboard the head serves (`--dashboard-port`): one static page
//! embedded in the binary (`dashboard.html`, plain HTML and a small script,
//! no build step) over a JSON API that answers what the state API answers.
//!
//! Nothing is served without the cluster's token: the login page takes it
//! (or the link `shoal start --head` prints carries it) and sets a cookie
//! that proves it (an HMAC of a fixed label under the token's secret, see
//! `JoinToken::dashboard_cookie`); every other request without that cookie
//! is refused: 401 for the API, a redirect to the login page for pages.
//!
//! Routes: `/` the page; `/login` (GET form, or `?token=`; POST form);
//! `/logout`; `/api/status`; `/api/list/KIND?filter=K=V&limit=N&detail=1`;
//! `/api/summary/KIND`.

use std::sync::Arc;

use serde_json::json;
use shoal_head::api::HeadService;
use shoal_net::http::{decode, Handler, Request, Response};
use shoal_net::JoinToken;
use shoal_proto::state::{Filter, StateKind, StateQuery, StateRows};
use shoal_proto::HeadReply;

/// The dashboard's port unless `--dashboard-port` says otherwise (Ray's).
/// Taken, a free one is used.
pub const PORT: u16 = 8265;

const PAGE: &str = include_str!("dashboard.html");
const COOKIE: &str = "shoal_session";

fn login_page(status: u16, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Shoal: log in</title>\
         <style>body{{font:15px system-ui,sans-serif;margin:4em auto;max-width:36em}}\
         input{{width:100%;font:inherit;padding:.4em}}button{{margin-top:.6em;font:inherit}}\
         .err{{color:#b00}}</style></head><body><h1>Shoal dashboard</h1>\
         <p>Paste the cluster's driver token (<code>shoal1d.…</code>; <code>shoal start --head</code> \
         printed it) or its cluster token (the session directory's <code>token</code> file).</p>\
         <p class=err>{message}</p>\
         <form method=post action=/login><input name=token type=password autofocus \
         placeholder=shoal1....><button type=submit>Log in</button></form></body></html>"
    );
    Response::new(status, "text/html; charset=utf-8", body)
}

fn json_response(status: u16, value: &serde_json::Value) -> Response {
    Response::new(
        status,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
    .with_header("Cache-Control", "no-store")
}

fn api_error(status: u16, message: impl Into<String>) -> Response {
    json_response(status, &json!({ "error": message.into() }))
}

fn rows_json(rows: &StateRows) -> serde_json::Value {
    json!({
        "rows": rows.rows.iter().map(crate::list::row_json).collect::<Vec<_>>(),
        "matched": rows.matched,
        "truncated": rows.truncated,
        "events_dropped": rows.events_dropped,
    })
}

/// Every `filter=` of a query string.
fn filters(query: &str) -> Result<Vec<Filter>, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == "filter")
        .map(|(_, v)| decode(v).parse::<Filter>())
        .collect()
}

/// The dashboard's handler for `service`, admitting holders of `token`.
pub fn handler(service: Arc<HeadService>, token: JoinToken) -> Handler {
    Arc::new(move |request: Request| serve(&service, &token, &request))
}

fn serve(service: &HeadService, token: &JoinToken, request: &Request) -> Response {
    let path = request.path.as_str();
    if path == "/login" {
        return login(token, request);
    }
    let admitted = request
        .cookie(COOKIE)
        .is_some_and(|c| token.dashboard_cookie_matches(c));
    if !admitted {
        if path.starts_with("/api/") {
            return api_error(
                401,
                "log in with the driver or cluster token first (/login)",
            );
        }
        return Response::redirect("/login");
    }
    if request.method != "GET" && path != "/logout" {
        return Response::text(405, "GET only\n");
    }
    match path {
        "/" | "/index.html" => Response::new(200, "text/html; charset=utf-8", PAGE)
            .with_header("Cache-Control", "no-store"),
        "/logout" => Response::redirect("/login").with_header(
            "Set-Cookie",
            format!("{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"),
        ),
        "/api/status" => json_response(200, &crate::status::to_json(&service.status())),
        _ => match path.strip_prefix("/api/job-logs/") {
            Some(job) => job_logs(service, job, request),
            None => api(service, request),
        },
    }
}

/// Most output one request shows: the end of a job's output.
const JOB_LOG_TAIL_MAX: u32 = 1 << 20;

/// `/api/job-logs/ID?tail=BYTES`: the end of a submitted job's output.
fn job_logs(service: &HeadService, job: &str, request: &Request) -> Response {
    let Ok(job_id) = job.parse() else {
        return api_error(404, format!("{job:?} is not a job id"));
    };
    let tail = request
        .param("tail")
        .and_then(|t| t.parse::<u32>().ok())
        .unwrap_or(64 << 10)
        .min(JOB_LOG_TAIL_MAX);
    // The size first, then the tail of it.
    let read = service.job_log(job_id, 0, 0).and_then(|size| match size {
        HeadReply::JobLog { size, .. } => {
            service.job_log(job_id, size.saturating_sub(u64::from(tail)), tail)
        }
        other => Ok(other),
    });
    match read {
        Ok(HeadReply::JobLog { data, size, done }) => json_response(
            200,
            &serde_json::json!({
                "output": String::from_utf8_lossy(&data),
                "size": size,
                "done": done,
            }),
        ),
        Ok(other) => api_error(500, format!("unexpected answer {other:?}")),
        Err(e) => api_error(404, e.message),
    }
}

fn login(token: &JoinToken, request: &Request) -> Response {
    let given = match request.method.as_str() {
        "POST" => request.form("token"),
        _ => request.param("token"),
    };
    let Some(given) = given else {
        return login_page(200, "");
    };
    if !token.matches_text(&given) {
        return login_page(401, "That is not this cluster's token.");
    }
    // `&job=ID` lands on that job's output (an id only: no open redirect).
    let landing = match request
        .param("job")
        .map(|j| j.parse::<shoal_proto::JobId>())
    {
        Some(Ok(job)) => format!("/?job={job}"),
        _ => "/".to_string(),
    };
    Response::redirect(&landing).with_header(
        "Set-Cookie",
        format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            token.dashboard_cookie()
        ),
    )
}

fn api(service: &HeadService, request: &Request) -> Response {
    let path = request.path.as_str();
    let (verb, kind) = match path.strip_prefix("/api/").and_then(|p| p.split_once('/')) {
        Some(split) => split,
        None => return api_error(404, format!("no such page {path:?}")),
    };
    let kind: StateKind = match kind.parse() {
        Ok(kind) => kind,
        Err(e) => return api_error(404, e),
    };
    let reply = match verb {
        "list" => {
            let filters = match filters(&request.query) {
                Ok(f) => f,
                Err(e) => return api_error(400, e),
            };
            let limit = request
                .param("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(100);
            let detail = request.param("detail").is_some_and(|d| d == "1");
            service.list_state(&StateQuery {
                kind,
                filters,
                limit,
                detail,
            })
        }
        "summary" => service.summarize(kind),
        _ => return api_error(404, format!("no such page {path:?}")),
    };
    match reply {
        Ok(HeadReply::State(rows)) => json_response(200, &rows_json(&rows)),
        Ok(other) => api_error(500, format!("unexpected answer {other:?}")),
        Err(e) => api_error(400, e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_read_from_the_query() {
        let f = filters("limit=5&filter=state%3DFAILED&filter=name!%3Df").expect("filters");
        assert_eq!(f.len(), 2);
        assert_eq!(
            (f[0].key.as_str(), f[0].value.as_str()),
            ("state", "FAILED")
        );
        assert_eq!(f[1].op, shoal_proto::state::FilterOp::Ne);
        assert!(filters("filter=nokey").is_err());
    }
}
