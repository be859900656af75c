//! Photo indexes: search rankings against the reference, resuming after an
//! interruption, growing, and refusing damaged or foreign indexes.

mod common;

use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;

use blip2::pipeline::index::PhotoIndex;
use blip2::pipeline::{Blip2, Error, IndexEvent, LoadOptions};
use common::{fixtures, model_dir, repo_root};
use serde::Deserialize;

#[derive(Deserialize)]
struct Ranking {
    text: String,
    itc: Vec<usize>,
    rerank: Vec<usize>,
}

#[derive(Deserialize)]
struct RetrievalReference {
    photos: Vec<String>,
    rankings: Vec<Ranking>,
}

fn load(name: &str) -> Blip2 {
    Blip2::from_dir(&model_dir(name), &LoadOptions::default()).unwrap()
}

/// A folder with copies of the repo's photos (and whatever `extra` adds).
fn photo_folder(names: &[String]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        std::fs::copy(repo_root().join("images").join(name), dir.path().join(name)).unwrap();
    }
    dir
}

fn run_index(
    blip2: &Blip2,
    photos: &Path,
    index: &Path,
    stop_after: Option<usize>,
) -> blip2::pipeline::IndexReport {
    let mut encoded = 0;
    let mut on_event = |event: IndexEvent<'_>| {
        if let IndexEvent::Encoded { .. } = event {
            encoded += 1;
            if Some(encoded) == stop_after {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    };
    blip2
        .index_photos(
            "itm-tiny",
            photos,
            index,
            &Default::default(),
            &mut on_event,
        )
        .unwrap()
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn search_returns_reference_rankings() {
    let blip2 = load("itm-tiny");
    let reference: RetrievalReference = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/itm-tiny.json")).unwrap(),
    )
    .unwrap();
    let photos = repo_root().join("images");
    let temp = tempfile::tempdir().unwrap();
    let index_dir = temp.path().join("photos.index");
    let report = run_index(&blip2, &photos, &index_dir, None);
    assert_eq!(
        report.encoded,
        reference.photos.len(),
        "every repo photo is indexed: {report:?}"
    );
    let mut index = PhotoIndex::open(&index_dir).unwrap();

    for ranking in &reference.rankings {
        let expected_itc: Vec<&str> = ranking
            .itc
            .iter()
            .map(|&i| reference.photos[i].as_str())
            .collect();
        let hits = blip2.search(&mut index, &ranking.text, 5, None).unwrap();
        let got: Vec<String> = hits.iter().map(|h| file_name(&h.path)).collect();
        assert_eq!(got, expected_itc, "ITC ranking for {:?}", ranking.text);

        let expected_rerank: Vec<&str> = ranking
            .rerank
            .iter()
            .map(|&i| reference.photos[i].as_str())
            .collect();
        let reranked = blip2.search(&mut index, &ranking.text, 5, Some(5)).unwrap();
        let got: Vec<String> = reranked.iter().map(|h| file_name(&h.path)).collect();
        assert_eq!(
            got, expected_rerank,
            "re-ranked order for {:?}",
            ranking.text
        );
        assert!(
            reranked
                .iter()
                .all(|r| r.itm_probability.is_some_and(|p| (0.0..=1.0).contains(&p)))
        );
    }
    let top2 = blip2
        .search(&mut index, &reference.rankings[0].text, 2, None)
        .unwrap();
    assert_eq!(top2.len(), 2);
}

fn index_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["index.json", "embeddings.npy", "entries.jsonl"]
        .iter()
        .map(|name| (name.to_string(), std::fs::read(dir.join(name)).unwrap()))
        .collect()
}

#[test]
fn interrupted_indexing_resumes_to_the_same_index() {
    let blip2 = load("itm-tiny");
    let names: Vec<String> = [
        "chelsea.png",
        "rocket.jpg",
        "coffee.png",
        "astronaut.png",
        "camera.png",
    ]
    .map(String::from)
    .to_vec();
    let folder = photo_folder(&names);
    let temp = tempfile::tempdir().unwrap();

    let whole = temp.path().join("whole.index");
    run_index(&blip2, folder.path(), &whole, None);

    let resumed = temp.path().join("resumed.index");
    let first = run_index(&blip2, folder.path(), &resumed, Some(2));
    assert!(first.stopped);
    assert_eq!(first.encoded, 2);
    // Traces of a run killed mid-write: half a row and half a log line.
    std::fs::OpenOptions::new()
        .append(true)
        .open(resumed.join("embeddings.npy"))
        .unwrap()
        .write_all(&[7u8; 100])
        .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(resumed.join("entries.jsonl"))
        .unwrap()
        .write_all(b"{\"row\": 2, \"pa")
        .unwrap();

    let second = run_index(&blip2, folder.path(), &resumed, None);
    assert_eq!(
        second.encoded, 3,
        "only the unfinished photos are encoded: {second:?}"
    );
    assert_eq!(second.unchanged, 2);
    assert_eq!(
        index_files(&resumed),
        index_files(&whole),
        "a resumed index equals an uninterrupted one"
    );
}

#[test]
fn index_grows_with_new_changed_and_removed_photos() {
    let blip2 = load("itm-tiny");
    let folder = photo_folder(&["chelsea.png".into(), "coffee.png".into()]);
    let temp = tempfile::tempdir().unwrap();
    let index_dir = temp.path().join("photos.index");
    assert_eq!(
        run_index(&blip2, folder.path(), &index_dir, None).encoded,
        2
    );

    std::fs::copy(
        repo_root().join("images/rocket.jpg"),
        folder.path().join("rocket.jpg"),
    )
    .unwrap();
    let report = run_index(&blip2, folder.path(), &index_dir, None);
    assert_eq!(
        (report.encoded, report.unchanged, report.indexed),
        (1, 2, 3),
        "{report:?}"
    );

    // Replace coffee.png with other content, and remove chelsea.png.
    std::fs::copy(
        repo_root().join("images/astronaut.png"),
        folder.path().join("coffee.png"),
    )
    .unwrap();
    std::fs::remove_file(folder.path().join("chelsea.png")).unwrap();
    let report = run_index(&blip2, folder.path(), &index_dir, None);
    assert_eq!(
        (
            report.encoded,
            report.unchanged,
            report.removed,
            report.indexed
        ),
        (1, 1, 1, 2),
        "{report:?}"
    );

    let index = PhotoIndex::open(&index_dir).unwrap();
    let names: Vec<String> = index.photos().keys().map(|p| file_name(p)).collect();
    assert_eq!(names, vec!["coffee.png", "rocket.jpg"]);
    assert_eq!(
        index.photos().values().map(|i| i.row).max(),
        Some(3),
        "the changed photo got a new row"
    );
}

#[test]
fn unreadable_photos_are_reported_and_the_rest_indexed() {
    let blip2 = load("itm-tiny");
    let folder = photo_folder(&["chelsea.png".into(), "rocket.jpg".into()]);
    std::fs::write(folder.path().join("broken.jpg"), b"not a jpeg").unwrap();
    std::fs::create_dir(folder.path().join("sub")).unwrap();
    std::fs::write(folder.path().join("sub/empty.png"), b"").unwrap();
    std::fs::write(folder.path().join("notes.txt"), b"ignored").unwrap();
    let temp = tempfile::tempdir().unwrap();
    let report = run_index(&blip2, folder.path(), &temp.path().join("i"), None);
    assert_eq!(report.encoded, 2, "{report:?}");
    let skipped: Vec<String> = report.skipped.iter().map(|(p, _)| file_name(p)).collect();
    assert_eq!(skipped, vec!["broken.jpg", "empty.png"]);
    assert!(report.skipped.iter().all(|(_, reason)| !reason.is_empty()));
}

#[test]
fn foreign_and_damaged_indexes_are_refused() {
    let tiny = load("itm-tiny");
    let wide = load("itm-wide");
    let folder = photo_folder(&["chelsea.png".into(), "coffee.png".into()]);
    let temp = tempfile::tempdir().unwrap();
    let index_dir = temp.path().join("photos.index");
    run_index(&tiny, folder.path(), &index_dir, None);

    let error = wide
        .index_photos(
            "itm-wide",
            folder.path(),
            &index_dir,
            &Default::default(),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, Error::Index { .. }), "{message}");
    assert!(
        message.contains("itm-tiny") && message.contains("itm-wide"),
        "names both models: {message}"
    );
    let mut index = PhotoIndex::open(&index_dir).unwrap();
    assert!(
        wide.search(&mut index, "a cat", 1, None).is_err(),
        "searching with another model is refused"
    );

    let damaged = |edit: &dyn Fn(&Path)| -> String {
        let copy = temp.path().join(format!("copy-{}", rand_suffix()));
        std::fs::create_dir(&copy).unwrap();
        for (name, bytes) in index_files(&index_dir) {
            std::fs::write(copy.join(name), bytes).unwrap();
        }
        edit(&copy);
        PhotoIndex::open(&copy).unwrap_err().to_string()
    };
    let message = damaged(&|dir| {
        let path = dir.join("embeddings.npy");
        let length = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(length - 200)
            .unwrap();
    });
    assert!(message.contains("truncated"), "{message}");
    let message = damaged(&|dir| std::fs::write(dir.join("index.json"), "{\"format\": 3").unwrap());
    assert!(message.contains("index.json"), "{message}");
    let message = damaged(&|dir| {
        std::fs::write(
            dir.join("entries.jsonl"),
            "{\"row\": 0, \"path\": \"a\", \"size\": 1, \"modified\": 2}\nnonsense\n",
        )
        .unwrap()
    });
    assert!(message.contains("line 2"), "{message}");
    let message = damaged(&|dir| std::fs::write(dir.join("embeddings.npy"), b"garbage").unwrap());
    assert!(message.contains("embeddings.npy"), "{message}");
    let missing = PhotoIndex::open(&temp.path().join("nothing-here"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("index.json"), "{missing}");
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    COUNTER.fetch_add(1, Ordering::SeqCst).to_string()
}
