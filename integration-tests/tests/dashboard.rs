//! The head's dashboard, in a real browser (headless Chromium) against a
//! live cluster of processes: the page lists the nodes and a finished job
//! once logged in with the token, and nothing is served without it.

use std::time::Duration;

use serde_json::Value;
use shoal_integration_tests::browser::{dump_dom, screenshot};
use shoal_integration_tests::prometheus::{http_get, http_raw};
use shoal_integration_tests::ProcessCluster;

const BROWSER: Duration = Duration::from_secs(90);

/// The status code, headers and body of a raw exchange.
fn exchange(addr: &str, request: &str) -> (u16, String, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    use std::io::{Read, Write};
    stream.write_all(request.as_bytes()).expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn get_with_cookie(addr: &str, path: &str, cookie: &str) -> (u16, String) {
    let (status, _, body) = exchange(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        ),
    );
    (status, body)
}

#[test]
fn the_dashboard_shows_the_cluster_to_a_browser_with_the_token_and_nothing_without() {
    let cluster = ProcessCluster::three_process();
    cluster.run_observed_job(20);
    let submitted = cluster.shoal(&[
        "job",
        "submit",
        "--",
        "sh",
        "-c",
        "echo hello-from-a-submitted-job",
    ]);
    assert!(submitted.status.success(), "{submitted:?}");
    let submitted_job = String::from_utf8_lossy(&submitted.stderr)
        .split_whitespace()
        .nth(1)
        .expect("the job id")
        .to_string();
    let addr = std::fs::read_to_string(cluster.root().join("session_latest/dashboard_address"))
        .expect("the head wrote its dashboard address")
        .trim()
        .to_string();
    let token = cluster.token();

    // Without the token: pages send to the login page, the API refuses.
    let (status, head, _) = exchange(&addr, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 303, "{head}");
    assert!(head.contains("Location: /login"), "{head}");
    for path in ["/api/status", "/api/list/nodes", "/api/summary/tasks"] {
        let (status, body) = http_get(&addr, path).expect("get");
        assert_eq!(status, 401, "{path}: {body}");
    }
    let (status, _) = get_with_cookie(&addr, "/api/status", "shoal_session=00ff00ff");
    assert_eq!(status, 401, "a forged cookie is refused");
    let (status, _) = http_get(&addr, "/login?token=shoal1.nonsense").expect("get");
    assert_eq!(status, 401, "a wrong token is refused");
    let (status, _) = http_raw(&addr, b"\x00garbage\r\n\r\n").expect("raw");
    assert_eq!(status, 400);

    // With it: a cookie, and the API answers what the state API does.
    let form = format!("token={token}");
    let (status, head, _) = exchange(
        &addr,
        &format!(
            "POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        ),
    );
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string();
    assert!(
        !cookie.contains(&token[40..]),
        "the cookie does not carry the secret"
    );
    let (status, body) = get_with_cookie(&addr, "/api/list/jobs", &cookie);
    assert_eq!(status, 200, "{body}");
    let jobs: Value = serde_json::from_str(&body).expect("json");
    let job = jobs["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|j| j["state"] == "FINISHED"))
        .unwrap_or_else(|| panic!("no finished job: {jobs:#}"))["job_id"]
        .as_str()
        .expect("job id")
        .to_string();
    let (status, body) = get_with_cookie(&addr, "/api/list/tasks?filter=state%3DFAILED", &cookie);
    assert_eq!(status, 200, "{body}");
    let failed: Value = serde_json::from_str(&body).expect("json");
    let rows = failed["rows"].as_array().expect("rows");
    assert!(
        !rows.is_empty() && rows.iter().all(|t| t["state"] == "FAILED"),
        "{failed:#}"
    );
    let (status, _) = get_with_cookie(&addr, "/api/list/tasks?filter=colour%3Dred", &cookie);
    assert_eq!(status, 400);
    let (status, _) = get_with_cookie(&addr, "/api/list/spaceships", &cookie);
    assert_eq!(status, 404);
    // A submitted job's output; bad or unknown ids are refused.
    let (status, body) = get_with_cookie(
        &addr,
        &format!("/api/job-logs/{submitted_job}?tail=100000000"),
        &cookie,
    );
    assert_eq!(status, 200, "{body}");
    let output: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(output["output"], "hello-from-a-submitted-job\n", "{output}");
    assert_eq!(output["done"], true, "{output}");
    for bad in [
        "/api/job-logs/not-an-id",
        "/api/job-logs/00000000000000000000000000000001",
        "/api/job-logs/../../token",
    ] {
        let (status, body) = get_with_cookie(&addr, bad, &cookie);
        assert_eq!(status, 404, "{bad}: {body}");
    }
    // The login link lands on a job's page, and on no other address.
    for (job, landing) in [
        (submitted_job.as_str(), format!("/?job={submitted_job}")),
        ("https://elsewhere.example/", "/".to_string()),
    ] {
        let (status, head, _) = exchange(
            &addr,
            &format!("GET /login?token={token}&job={job} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 303, "{head}");
        assert!(head.contains(&format!("Location: {landing}\r\n")), "{head}");
    }

    // A real browser follows the printed link: logged in, the page lists
    // the nodes and the finished job.
    let nodes: Vec<String> = cluster.status()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(nodes.len(), 3);
    let link = format!("http://{addr}/login?token={token}");
    let dom = dump_dom(&link, BROWSER);
    for node in &nodes {
        assert!(
            dom.contains(node.as_str()),
            "node {node} is not on the page:\n{dom}"
        );
    }
    assert!(
        dom.contains(&job),
        "the finished job {job} is not on the page:\n{dom}"
    );
    assert!(
        dom.contains("scenarios::say"),
        "the tasks are listed:\n{dom}"
    );
    // A submitted job's output, from its link.
    let dom = dump_dom(&format!("{link}&job={submitted_job}"), BROWSER);
    assert!(
        dom.contains("hello-from-a-submitted-job") && dom.contains("SUCCEEDED"),
        "the job's output is on its page:\n{dom}"
    );
    // Without the token the browser gets the login page only.
    let dom = dump_dom(&format!("http://{addr}/"), BROWSER);
    assert!(dom.contains("Paste the cluster's driver token"), "{dom}");
    assert!(!nodes.iter().any(|n| dom.contains(n.as_str())), "{dom}");

    // A screenshot, for a person to look at (not committed).
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let file = dir.join("dashboard.png");
    assert!(screenshot(&link, &file, BROWSER), "no screenshot written");
    println!("dashboard screenshot: {}", file.display());
}
