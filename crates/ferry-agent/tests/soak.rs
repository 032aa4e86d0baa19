//! Soak (long suite, `FERRY_LONG=1`): one guest migrated back and forth between two real
//! agents `FERRY_SOAK_MIGRATIONS` times (default 200). Nothing may outlive its migration:
//! afterwards each agent's open file descriptors and threads are back within a small
//! constant of where they were after a warm-up, its RSS within a stated bound, and the
//! journal keeps no more history than `journal_history` says. The guest's own memory
//! check runs every 50 moves and at the end.

use ferry_api::v1 as pb;
use ferry_testkit::{guest_artifacts, workload_cmdline, TestAgent, TestPki};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const VM: &str = "soak01";
const HISTORY: usize = 40;
/// Allowed growth after the warm-up.
const FD_SLACK: i64 = 12;
const THREAD_SLACK: i64 = 6;
const RSS_SLACK_KIB: i64 = 48 * 1024;

#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: i64,
    threads: i64,
    rss_kib: i64,
}

fn usage(agent: &TestAgent) -> Usage {
    let pid = agent.pid().expect("agent runs");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as i64)
        .unwrap_or(-1);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    Usage {
        fds,
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
    }
}

async fn check_guest(agent: &TestAgent) {
    let r = agent.guest_check(VM).await.expect("guest check");
    assert!(r.ok, "guest memory check failed on {}: {r:?}", agent.name());
}

async fn migrate(from: &TestAgent, to: &TestAgent) -> pb::MigrationStatus {
    let mut c = from.client().await.expect("client");
    let req = pb::StartMigrationRequest {
        vm: VM.into(),
        target: to.grpc_addr(),
        compress: "lz4".into(),
        ..Default::default()
    };
    let id = c.start_migration(req).await.expect("start").into_inner().id;
    ferry_testkit::watch_to_end(&mut c, &id)
        .await
        .expect("watch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_back_and_forth() {
    if std::env::var("FERRY_LONG").ok().as_deref() != Some("1") {
        eprintln!("soak: long suite only (FERRY_LONG=1)");
        return;
    }
    let n: usize = std::env::var("FERRY_SOAK_MIGRATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::new(&dir.path().join("pki"), &["a", "b"]).expect("pki");
    let extra = format!("journal_history = {HISTORY}\n");
    let ferryd = PathBuf::from(env!("CARGO_BIN_EXE_ferryd"));
    let a = TestAgent::start_with_config(&ferryd, "a", &pki, dir.path(), "tcg", &extra)
        .await
        .expect("agent a");
    let b = TestAgent::start_with_config(&ferryd, "b", &pki, dir.path(), "tcg", &extra)
        .await
        .expect("agent b");
    let g = guest_artifacts().expect("guest artifacts");
    let spec = pb::VmSpec {
        name: VM.into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: g.kernel.display().to_string(),
        initrd: g.initrd.display().to_string(),
        cmdline: workload_cmdline(64, 5.0, "realistic", 3),
        ..Default::default()
    };
    a.define_and_boot(spec).await.expect("boot the guest");
    let agents = [&a, &b];
    let t0 = Instant::now();
    let mut base = None;
    let mut downtimes = Vec::new();
    for i in 0..n {
        let (from, to) = (agents[i % 2], agents[(i + 1) % 2]);
        let end = migrate(from, to).await;
        assert_eq!(
            end.phase,
            pb::MigrationPhase::Completed as i32,
            "migration {i} {} -> {}: {end:?}\n{}",
            from.name(),
            to.name(),
            from.log_tail()
        );
        downtimes.push(end.stats.as_ref().map(|s| s.downtime_ms).unwrap_or(0));
        if i == 3 {
            // After a warm-up (allocator pools, connection caches, lazily started tasks).
            base = Some((usage(&a), usage(&b)));
        }
        if (i + 1) % 50 == 0 {
            check_guest(to).await;
            eprintln!(
                "{} migrations in {:.0} s: a {:?}, b {:?}",
                i + 1,
                t0.elapsed().as_secs_f64(),
                usage(&a),
                usage(&b)
            );
        }
    }
    check_guest(agents[n % 2]).await;
    // Let the last migration's tasks (relay accounting, connection close) finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (base_a, base_b) = base.expect("warm-up done");
    let (end_a, end_b) = (usage(&a), usage(&b));
    downtimes.sort_unstable();
    eprintln!(
        "soak: {n} migrations in {:.0} s; downtime median {} ms, p95 {} ms; a {base_a:?} -> {end_a:?}; b {base_b:?} -> {end_b:?}",
        t0.elapsed().as_secs_f64(),
        downtimes[downtimes.len() / 2],
        downtimes[downtimes.len() * 95 / 100]
    );
    for (name, b0, e) in [("a", base_a, end_a), ("b", base_b, end_b)] {
        assert!(
            e.fds - b0.fds <= FD_SLACK,
            "agent {name} leaked file descriptors: {b0:?} -> {e:?}"
        );
        assert!(
            e.threads - b0.threads <= THREAD_SLACK,
            "agent {name} leaked threads: {b0:?} -> {e:?}"
        );
        assert!(
            e.rss_kib - b0.rss_kib <= RSS_SLACK_KIB,
            "agent {name} RSS grew beyond {RSS_SLACK_KIB} KiB: {b0:?} -> {e:?}"
        );
    }
    for agent in agents {
        let mut c = agent.client().await.expect("client");
        let kept = c
            .list_migrations(pb::ListMigrationsRequest {})
            .await
            .expect("list")
            .into_inner()
            .migrations
            .len();
        assert!(
            kept <= HISTORY,
            "agent {} keeps {kept} migrations of history (journal_history = {HISTORY})",
            agent.name()
        );
    }
}
