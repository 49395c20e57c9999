//! The broker killed (`kill -9`) and started again mid-campaign, on its
//! durable storage engine (`sqlite://`): producers and consumers recover,
//! and nothing is lost or sent twice.
//!
//! Behind its own target (`make test-broker-restart`), not in `make test`:
//! tansu 0.6.0's sqlite engine panics under this load ("more or less than
//! one row" in its idempotent-producer check, after which every request
//! fails) — seen with 50,000 recipients before any kill, and with 5,000
//! after the restart; with 3,000 the scenario ran through. The panic is
//! the local broker's (its memory engine, which `make test` uses, has no
//! such check); Apache Kafka, which production runs on, is not affected.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use ledger_tests::*;

use crate::common::{check, start, wait_settled, Moments, Received, Started};

/// A tansu broker of the test's own on `port`, storing in `dir/ledger.db`.
struct Broker {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

fn tansu() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).find(|t| t.exists()))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        let home = std::env::var("CARGO_HOME")
            .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
        Path::new(&home).join("bin/tansu")
    })
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        std::fs::create_dir_all(dir).expect("dir");
        let mut b = Broker { dir: dir.to_owned(), port: free_port(), child: None };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("tansu.log")).expect("log");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = std::process::Command::new(tansu())
            .current_dir(&self.dir)
            .env("RUST_LOG", std::env::var("LEDGER_TEST_TANSU_LOG").unwrap_or_else(|_| "warn".into()))
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://ledger.db"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("tansu (infra/broker.sh install)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reaped");
        }
    }

    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Recipients: `LEDGER_RESTART_RECIPIENTS`, default 3,000 (see above).
fn restart_recipients() -> usize {
    std::env::var("LEDGER_RESTART_RECIPIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tansu's sqlite engine panics under load: `make test-broker-restart`"]
async fn the_broker_killed_and_restarted_mid_campaign_loses_nothing() {
    let n = restart_recipients();
    let (mut moments, seed) = Moments::new();
    let mut config = test_config();
    let mut broker = Broker::start(&config.sink.dir.parent().expect("dir").join("broker"));
    config.kafka.brokers = broker.brokers();
    config.sink.latency_ms = 5;
    config.dispatcher.claim_lease_secs = 3;
    config.dispatcher.provider_timeout_ms = 2_000;
    let Started { mut roles, api_key, reporting, http, base } = start(&config).await;
    let (intent, _) = submit_until_accepted(
        &http,
        &base,
        &api_key,
        "restart",
        &ndjson_campaign("restart", "b", n),
        Duration::from_secs(120),
    )
    .await;

    let target = (n as f64 * moments.between(0.1, 0.6)) as usize;
    eventually("deliveries under way", Duration::from_secs(300), || async {
        (sink_counts(&config).len() >= target).then_some(())
    })
    .await;
    broker.kill();
    let at = sink_counts(&config).len();
    let down = Duration::from_millis(moments.between(2_000.0, 6_000.0) as u64);
    tokio::time::sleep(down).await;
    broker.spawn();
    let back = Instant::now();
    wait_settled(&mut roles, &reporting, &intent, n, Duration::from_secs(600)).await;
    let recovered = back.elapsed();
    roles.stop();
    let notes = format!(
        "seed {seed}; broker (sqlite://) killed at {at} delivered, down {:.1} s, every role recovered without a \
         restart; settled {:.1} s after it came back",
        down.as_secs_f64(),
        recovered.as_secs_f64()
    );
    let row =
        check(&config, &reporting, &intent, n, Received::Sink, "broker kill -9 and restart (sqlite storage)", notes)
            .await;
    assert_eq!(row.dead_lettered, 0, "{row:?}");
    reporting.close().await;
    drop_databases(&config).await;
}
