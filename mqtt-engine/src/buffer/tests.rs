//! The buffer against a real SQLite file in a temporary directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fieldmq-buffer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn settings(dir: &std::path::Path, max_size: u64, when_full: WhenFull) -> BufferSettings {
    BufferSettings {
        path: dir.join("buffer.db"),
        max_size,
        when_full,
        commit_interval: Duration::from_millis(10),
    }
}

fn route(name: &str, filter: &str) -> Route {
    Route { name: name.into(), forward: vec![TopicFilter::new(filter).expect("filter")] }
}

fn topic(s: &str) -> TopicName {
    TopicName::new(s).expect("topic")
}

fn wait_committed(buffer: &Buffer, seq: u64) {
    let rx = buffer.committed();
    let deadline = Instant::now() + Duration::from_secs(5);
    while *rx.borrow() < seq {
        assert!(Instant::now() < deadline, "ticket {seq} not committed");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn offer_n(buffer: &Buffer, t: &str, n: usize, size: usize) -> u64 {
    let mut last = 0;
    for i in 0..n {
        let mut payload = format!("{i}").into_bytes();
        payload.resize(size.max(payload.len()), b' ');
        match buffer.offer(&topic(t), &Bytes::from(payload), false) {
            Offer::Taken(seq) => last = seq,
            other => panic!("offer {i}: {other:?}"),
        }
    }
    last
}

fn read_all(buffer: &Buffer, name: &str) -> Vec<Row> {
    let upto = *buffer.committed_rows().borrow();
    let after = buffer.cursor(name).expect("cursor").acked();
    buffer.reader(name).expect("reader").batch(after, upto, 1_000_000).expect("batch").rows
}

#[test]
fn rows_come_back_in_order_and_survive_a_reopen() {
    let d = dir("reopen");
    let buffer =
        Buffer::open(settings(&d, 1 << 20, WhenFull::DropOldest), &[route("cloud", "a/#")]).expect("open");
    assert_eq!(buffer.offer(&topic("b/x"), &Bytes::from_static(b"no"), false), Offer::NotForwarded);
    let last = offer_n(&buffer, "a/x", 100, 10);
    wait_committed(&buffer, last);
    let rows = read_all(&buffer, "cloud");
    assert_eq!(rows.len(), 100);
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(&rows[0].payload[..2], b"0 ");
    // The first 40 are acknowledged; the rest must survive a restart.
    buffer.cursor("cloud").expect("cursor").advance(rows[39].id, true);
    buffer.close();
    let buffer =
        Buffer::open(settings(&d, 1 << 20, WhenFull::DropOldest), &[route("cloud", "a/#")]).expect("reopen");
    let rows = read_all(&buffer, "cloud");
    assert_eq!(rows.len(), 60);
    assert_eq!(&rows[0].payload[..3], b"40 ");
    let stats = stats::read(&d.join("buffer.db")).expect("stats");
    assert_eq!(stats.upstreams[0].waiting, 60);
    assert!(stats.upstreams[0].last_delivery_ms.is_some());
    buffer.close();
}

#[test]
fn each_upstream_keeps_its_own_cursor() {
    let d = dir("two");
    let routes = [route("a", "x/#"), route("b", "#")];
    let buffer = Buffer::open(settings(&d, 1 << 20, WhenFull::DropOldest), &routes).expect("open");
    offer_n(&buffer, "x/1", 10, 4);
    let last = offer_n(&buffer, "y/1", 5, 4);
    wait_committed(&buffer, last);
    assert_eq!(read_all(&buffer, "a").len(), 10);
    assert_eq!(read_all(&buffer, "b").len(), 15);
    // b takes everything; a is dead: nothing a still waits for is deleted.
    let upto = *buffer.committed_rows().borrow();
    buffer.cursor("b").expect("b").advance(upto, true);
    buffer.nudge();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read_all(&buffer, "a").len(), 10);
    assert_eq!(read_all(&buffer, "b").len(), 0);
    buffer.close();
}

#[test]
fn drop_oldest_keeps_the_newest_and_counts() {
    let d = dir("drop");
    let buffer =
        Buffer::open(settings(&d, 256 * 1024, WhenFull::DropOldest), &[route("cloud", "#")]).expect("open");
    let mut last = 0;
    for chunk in 0..20 {
        for i in 0..100 {
            let payload = Bytes::from(format!("{:06}{}", chunk * 100 + i, " ".repeat(2000)));
            if let Offer::Taken(seq) = buffer.offer(&topic("t"), &payload, false) {
                last = seq;
            }
        }
        wait_committed(&buffer, last);
    }
    let rows = read_all(&buffer, "cloud");
    let cursor = buffer.cursor("cloud").expect("cursor");
    assert!(cursor.dropped() > 0, "nothing dropped");
    assert_eq!(rows.len() as i64 + cursor.dropped(), 2000, "every row is either kept or counted");
    assert_eq!(&rows.last().expect("rows").payload[..6], b"001999", "the newest row is kept");
    let size = std::fs::metadata(d.join("buffer.db")).expect("db").len();
    assert!(size <= 256 * 1024, "the file grew to {size}");
    buffer.close();
}

#[test]
fn reject_new_refuses_once_full() {
    let d = dir("reject");
    let buffer =
        Buffer::open(settings(&d, 256 * 1024, WhenFull::RejectNew), &[route("cloud", "#")]).expect("open");
    let mut refused = 0;
    let mut taken = Vec::new();
    for i in 0..2000 {
        let payload = Bytes::from(format!("{i:06}{}", " ".repeat(2000)));
        match buffer.offer(&topic("t"), &payload, false) {
            Offer::Taken(seq) => taken.push(seq),
            Offer::Refused => refused += 1,
            Offer::NotForwarded => unreachable!(),
        }
        if i % 50 == 49 {
            if let Some(last) = taken.last() {
                wait_committed(&buffer, *last);
            }
        }
    }
    let rows = read_all(&buffer, "cloud");
    assert!(refused > 0, "nothing refused");
    assert_eq!(&rows[0].payload[..6], b"000000", "the oldest rows are kept");
    let dropped = buffer.cursor("cloud").expect("cursor").dropped();
    assert_eq!(rows.len() as i64 + dropped, 2000, "every row is either kept or counted");
    buffer.close();
}

#[test]
fn a_foreign_or_corrupt_file_is_moved_aside() {
    for (name, content) in [
        ("garbage", b"this is not a database at all, not even close......".to_vec()),
        ("foreign", Vec::new()),
    ] {
        let d = dir(name);
        let path = d.join("buffer.db");
        if content.is_empty() {
            let conn = rusqlite::Connection::open(&path).expect("sqlite");
            conn.execute_batch("CREATE TABLE notes (x TEXT); INSERT INTO notes VALUES ('mine');")
                .expect("foreign");
        } else {
            std::fs::write(&path, content.repeat(100)).expect("write");
        }
        let buffer =
            Buffer::open(settings(&d, 1 << 20, WhenFull::DropOldest), &[route("cloud", "#")]).expect("open");
        let aside: Vec<_> = std::fs::read_dir(&d)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("buffer.db."))
            .collect();
        assert_eq!(aside.len(), 1, "{name}: the old file is kept aside");
        let last = offer_n(&buffer, "t", 1, 1);
        wait_committed(&buffer, last);
        buffer.close();
    }
}
