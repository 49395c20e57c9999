//! `kill -9` each role in turn at a random moment of a 50,000-recipient
//! campaign, and start it again.

use std::time::{Duration, Instant};

use ledger_schemas::Topic;
use ledger_tests::*;

use crate::common::*;

/// Waits until `progress()` reaches `target` (or the stage is done), and
/// says how far it had got.
async fn when_reached<F: FnMut() -> i64>(mut progress: F, target: i64, roles: &mut Roles) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        roles.assert_running();
        let now = progress();
        if now >= target {
            return now;
        }
        assert!(Instant::now() < deadline, "stuck at {now} of {target}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One run in five once ended with 44 rendered records never claimed (one
/// contiguous range of one partition, committed past by the restarted
/// dispatcher's group): the local broker let a reader step over a batch
/// still being stored while a later one was readable, which a renderer
/// restart (two connections producing at once) provokes. Fixed in the
/// broker's patch; `broker::a_reader_following_concurrent_producers_sees_every_offset`
/// checks it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_each_role_mid_campaign_loses_nothing_and_sends_nothing_twice() {
    let n = recipients();
    let (mut moments, seed) = Moments::new();
    let mut config = test_config();
    // Calls in flight at every moment, so the dispatcher's kill leaves some
    // attempted without an outcome.
    config.sink.latency_ms = 5;
    config.dispatcher.claim_lease_secs = 3;
    config.dispatcher.provider_timeout_ms = 2_000;
    let Started { mut roles, api_key, reporting, http, base } = start(&config).await;
    let mut notes = vec![format!("seed {seed}")];

    // Ingest: killed while the campaign is being submitted; the producer
    // submits again with the same key and body until it is accepted.
    let body = ndjson_campaign("crash", "r", n);
    let first = {
        let (http, base, key, body) = (http.clone(), base.clone(), api_key.clone(), body.clone());
        tokio::spawn(async move { post_campaign(&http, &base, &key, "crash-campaign", &body).await })
    };
    let after = Duration::from_millis(moments.between(50.0, 1_500.0) as u64);
    tokio::time::sleep(after).await;
    roles.kill("ingest");
    let first = first.await.expect("join");
    roles.spawn("ingest");
    wait_ready(&http, &base).await;
    let (intent, tries) =
        submit_until_accepted(&http, &base, &api_key, "crash-campaign", &body, Duration::from_secs(120)).await;
    if let Ok(earlier) = &first {
        assert_eq!(earlier, &intent, "the same key and body are the same intent");
    }
    notes.push(format!(
        "ingest killed {} ms into the POST ({}), accepted on try {tries}",
        after.as_millis(),
        if first.is_ok() { "after its 202" } else { "before an answer" }
    ));

    // Renderer: killed after a random share of the messages is rendered.
    let target = (n as f64 * moments.between(0.05, 0.5)) as i64;
    let at = when_reached(|| topic_end(&config, Topic::Rendered), target, &mut roles).await;
    roles.kill("render");
    roles.spawn("render");
    notes.push(format!("render killed at {at} rendered"));

    // Dispatcher: killed after a random further share is delivered.
    let now = sink_counts(&config).len() as i64;
    let target = now + ((n as i64 - now) as f64 * moments.between(0.1, 0.6)) as i64;
    let at = when_reached(|| sink_counts(&config).len() as i64, target, &mut roles).await;
    roles.kill("dispatch");
    roles.spawn("dispatch");
    notes.push(format!("dispatch killed at {at} delivered"));

    // Projector: killed while it folds, after a random share is in the
    // read model.
    let in_model = || {
        let reporting = reporting.clone();
        let intent = intent.clone();
        move || {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current()
                    .block_on(async { settled_count(&status_counts_of(&reporting, &intent).await) })
            })
        }
    };
    let now = in_model()();
    let target = now + ((n as i64 - now) as f64 * moments.between(0.1, 0.7)) as i64;
    let at = when_reached(in_model(), target, &mut roles).await;
    roles.kill("project");
    roles.spawn("project");
    notes.push(format!("project killed at {at} settled in the read model"));

    wait_settled(&mut roles, &reporting, &intent, n, Duration::from_secs(600)).await;
    notes.push(format!("starts {:?}", roles.starts));
    let config = roles.config.clone();
    roles.stop();
    let row = check(
        &config,
        &reporting,
        &intent,
        n,
        Received::Sink,
        "process kills (kill -9 each role once)",
        notes.join("; "),
    )
    .await;
    assert_eq!(row.dead_lettered, 0, "nothing dead-lettered: {row:?}");
    reporting.close().await;
    drop_databases(&config).await;
}
