//! Loading a checkpoint by hub id from a Hugging Face-compatible server on 127.0.0.1
//! that this test starts, then from the cache offline, and the errors without a server.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use blip2::pipeline::{Blip2, Error, LoadOptions};
use common::{model_dir, photo, reference};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `/{repo}/resolve/main/{file}` like the hub: HEAD, GET and ranged GET, with
/// the `ETag`, `X-Repo-Commit` and `Content-Range` headers the hub client reads.
struct HubServer {
    endpoint: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl HubServer {
    fn start(repos: HashMap<String, HashMap<String, Vec<u8>>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                        stream.set_nonblocking(false).unwrap();
                        let _ = serve(stream, &repos);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        Self {
            endpoint,
            requests,
            stop,
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    mut stream: TcpStream,
    repos: &HashMap<String, HashMap<String, Vec<u8>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        if header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = value.trim().strip_prefix("bytes=").map(str::to_string);
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let file = path.split_once("/resolve/main/").and_then(|(repo, file)| {
        repos
            .get(repo.trim_start_matches('/'))
            .and_then(|files| files.get(file))
    });
    let Some(body) = file else {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let etag = format!(
        "{:016x}",
        body.iter()
            .fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64)
                .wrapping_mul(0x100000001b3))
    );
    let (status, slice, content_range) = match range {
        Some(range) => {
            let (start, end) = range.split_once('-').unwrap();
            let start: usize = start.parse().unwrap();
            let end: usize = if end.is_empty() {
                body.len() - 1
            } else {
                end.parse::<usize>().unwrap().min(body.len() - 1)
            };
            (
                "206 Partial Content",
                &body[start..=end],
                Some(format!("bytes {start}-{end}/{}", body.len())),
            )
        }
        None => ("200 OK", &body[..], None),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n",
        slice.len()
    );
    if let Some(content_range) = content_range {
        head.push_str(&format!("Content-Range: {content_range}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(slice)?;
    }
    Ok(())
}

fn files_of(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).unwrap(),
            )
        })
        .collect()
}

fn set_env(key: &str, value: Option<&str>) {
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        match value {
            Some(value) => std::env::set_var(key, value),
            None => std::env::remove_var(key),
        }
    }
}

#[test]
fn hub_download_cache_and_offline() {
    let home = tempfile::tempdir().unwrap();
    let mut repos = HashMap::new();
    repos.insert(
        "blip2-test/opt-proj-sharded".to_string(),
        files_of(&model_dir("opt-proj-sharded")),
    );
    let mut pickle_only = files_of(&model_dir("opt-tiny"));
    pickle_only.remove("model.safetensors");
    pickle_only.insert("pytorch_model.bin".into(), b"never downloaded".to_vec());
    repos.insert("blip2-test/pickle-only".to_string(), pickle_only);
    let server = HubServer::start(repos);

    set_env("HF_HOME", Some(home.path().to_str().unwrap()));
    set_env("HF_ENDPOINT", Some(&server.endpoint));
    set_env("HF_HUB_OFFLINE", None);

    // Download, then check the model works and the standard cache layout was used.
    let blip2 =
        Blip2::from_pretrained("blip2-test/opt-proj-sharded", &LoadOptions::default()).unwrap();
    let snapshot = home
        .path()
        .join("hub/models--blip2-test--opt-proj-sharded/snapshots")
        .join(COMMIT);
    assert!(
        snapshot.join("model.safetensors.index.json").exists(),
        "no snapshot at {}",
        snapshot.display()
    );
    assert!(snapshot.join("model-00003-of-00004.safetensors").exists());
    let meta = reference("opt-proj-sharded");
    let image = blip2::image::load_image(photo(&meta.photos[0]), &Default::default()).unwrap();
    let mut options = blip2.default_generation_options();
    options.max_new_tokens = 12;
    let caption = blip2.caption(&image, None, &options).unwrap();
    let case = meta
        .cases
        .iter()
        .find(|c| c.name == "greedy_image0")
        .unwrap();
    assert_eq!(
        caption.token_ids, case.tokens[0][0],
        "caption through the hub differs from the reference"
    );

    // Pickle weights are refused without being downloaded.
    let error =
        Blip2::from_pretrained("blip2-test/pickle-only", &LoadOptions::default()).unwrap_err();
    assert!(matches!(error, Error::PickleOnly { .. }), "{error}");
    let blobs: Vec<Vec<u8>> = std::fs::read_dir(
        home.path()
            .join("hub/models--blip2-test--pickle-only/blobs"),
    )
    .unwrap()
    .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
    .collect();
    assert!(
        !blobs.is_empty(),
        "the config and tokenizer of the pickle-only repo should be fetched"
    );
    assert!(
        blobs.iter().all(|blob| blob != b"never downloaded"),
        "pytorch_model.bin was downloaded"
    );

    // An unknown repository: the error names it and how to use a local directory.
    let message = Blip2::from_pretrained("blip2-test/missing", &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(message.contains("blip2-test/missing"), "{message}");
    assert!(message.contains("--model"), "{message}");

    // Offline: the cached copy loads without the server.
    let before = server.requests.load(Ordering::SeqCst);
    drop(server);
    set_env("HF_HUB_OFFLINE", Some("1"));
    let cached =
        Blip2::from_pretrained("blip2-test/opt-proj-sharded", &LoadOptions::default()).unwrap();
    assert_eq!(
        cached.caption(&image, None, &options).unwrap().token_ids,
        caption.token_ids
    );
    let message = Blip2::from_pretrained("blip2-test/never-cached", &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
    assert!(message.contains("--model"), "{message}");
    assert!(before > 0);

    // No server at all: the error says how to point --model at a local directory.
    set_env("HF_HUB_OFFLINE", None);
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    set_env("HF_ENDPOINT", Some(&closed_endpoint));
    set_env("HF_HOME", Some(home.path().join("empty").to_str().unwrap()));
    let message = Blip2::from_pretrained("Salesforce/blip2-opt-2.7b", &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(message.contains("Salesforce/blip2-opt-2.7b"), "{message}");
    assert!(message.contains("--model DIR"), "{message}");
}
