//! `blip2 serve` as a process: it listens on 127.0.0.1, serves requests, and stops cleanly
//! on SIGTERM. A port in use is reported before the model is loaded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn model(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
        .display()
        .to_string()
}

fn blip2() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_blip2"));
    command.env_remove("RUST_LOG").env("HF_HUB_OFFLINE", "1");
    command
}

/// A plain HTTP/1.1 GET; returns the whole response, head and body.
fn get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("the server accepts connections");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[cfg(unix)]
#[test]
fn serve_answers_then_stops_on_sigterm() {
    let mut child = blip2()
        .args(["serve", "--model", &model("opt-tiny"), "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the blip2 binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        // "Serving the BLIP-2 demo on http://127.0.0.1:PORT/ (Ctrl-C stops it)"
        if let Some(rest) = line.split("demo on http://").nth(1) {
            addr = rest
                .split('/')
                .next()
                .map(|a| a.parse::<SocketAddr>().unwrap());
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no address printed; stderr:\n{log}"));
    assert!(addr.ip().is_loopback(), "{addr}");
    let rest =
        std::thread::spawn(move || lines.map(|line| line.unwrap() + "\n").collect::<String>());

    let health = get(addr, "/api/health");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains(r#""kind":"captioning""#), "{health}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let log = log + &rest.join().unwrap();
    assert!(status.success(), "exit {status:?}; stderr:\n{log}");
    assert!(log.contains("received SIGTERM"), "{log}");
    assert!(log.contains("server stopped"), "{log}");
}

#[test]
fn serve_reports_port_in_use_before_loading() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    // The model does not exist: the port must be reported first.
    let output = blip2()
        .args(["serve", "--model", "/nonexistent/model", "--port", &port])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn serve_rejects_zero_limit() {
    let output = blip2()
        .args([
            "serve",
            "--model",
            &model("opt-tiny"),
            "--port",
            "0",
            "--queue-size",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--queue-size"), "{stderr}");
    assert!(stderr.contains("0 is not in 1.."), "{stderr}");
}
