//! Fault runs, short versions: clients loop on one lock while the nemesis injects a fault, and
//! the checker reads every history afterwards (see `lockgate_testenv::{fault, checker}`).
//! `cargo run -p lockgate-testenv --bin faults -- --minutes N` runs them longer; RELIABILITY.md
//! has the figures.
//!
//! The planted-bug runs must be caught: a run with a client misconfigured with a short TTL, a
//! fenced register whose check is off while a paused `lockgate exec` command writes, and a
//! worker that ignores its lost-lease signal. A checker that passes them would pass anything.
//!
//! Runs that restart the API server or etcd take the environment for themselves; the others run
//! two at a time (the test harness's threads).

use lockgate_testenv::fault::environment_lock;
use lockgate_testenv::fault_plans::{self, exclusive, PLANTED};

async fn run(name: &str) -> lockgate_testenv::fault::Outcome {
    let plan = fault_plans::plan(name, 1).await;
    let outcome = if exclusive(name) {
        let _env = environment_lock().write().await;
        plan.run().await
    } else {
        let _env = environment_lock().read().await;
        plan.run().await
    };
    eprintln!("{outcome}");
    outcome
}

/// The run must pass the checker, and each of its faults must have found a victim.
async fn clean(name: &str) {
    let o = run(name).await;
    assert!(o.report.ok(), "{o}");
    assert!(o.missed.is_empty(), "faults found no victim: {o}");
    // Plans whose holds last 4 to 6 s manage about five in a short run on a loaded machine;
    // fewer than four means the clients hardly worked.
    assert!(o.report.holds >= 4, "too few holds to mean anything: {o}");
}

/// The planted bug must be reported as the violation it causes.
async fn caught(name: &str) {
    let kind = PLANTED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
        .unwrap();
    let o = run(name).await;
    assert!(
        o.report.count(kind) > 0,
        "the planted bug of {name} was not caught as {kind}: {o}"
    );
}

macro_rules! runs {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            clean($name).await;
        }
    )*};
}

runs! {
    kubernetes_holder_sigkill => "kube-kill",
    kubernetes_holder_paused_longer_than_the_ttl => "kube-pause",
    kubernetes_api_server_restart => "kube-restart-apiserver",
    kubernetes_etcd_restart => "kube-restart-etcd",
    kubernetes_api_server_and_etcd_restart => "kube-restart-both",
    kubernetes_holder_black_holed_longer_than_the_ttl => "kube-black-hole",
    kubernetes_replies_lost => "kube-reply-loss",
    kubernetes_latency_near_the_request_timeout => "kube-latency",
    kubernetes_clock_skew_and_a_clock_stepped_back => "kube-clock-skew",
    kubernetes_mixed_faults => "kube-mixed",
    go_and_rust_fleet_holder_sigkill => "go-fleet-kill",
    go_waiters_wait_for_a_rust_holder_ten_minutes_slow => "go-waiter-skewed-rust-holder",
    exec_sigkill_of_lockgate => "exec-kill",
    file_holders_killed_mid_write_on_tmpfs => "file-kill-tmpfs",
    file_holders_killed_mid_write_with_gc_on_ext4 => "file-gc-ext4",
    http_server_kill_9_and_restart => "http-server-restart",
}

/// `lockgate exec` paused longer than the TTL while its command keeps writing with its token:
/// the register must refuse the command's writes once another holder took over (and the run
/// must show that it did: the scenario happened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_paused_while_its_command_writes_is_fenced_off() {
    let o = run("exec-pause").await;
    assert!(o.report.ok(), "{o}");
    assert!(o.missed.is_empty(), "{o}");
    assert!(
        o.report.refused_writes > 0,
        "the paused command never wrote after the takeover: {o}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_a_client_with_a_shorter_ttl_is_caught() {
    caught("planted-short-ttl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_a_register_without_its_check_is_caught() {
    caught("planted-no-fence").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_a_worker_that_ignores_its_lost_signal_is_caught() {
    caught("planted-ignore-lost").await;
}
