//! A waiter does not poll: the requests a waiting Kubernetes client makes during a 10 s wait,
//! counted by the real API server (its audit log, for a user of the waiter's own; see
//! `lockgate_testenv::audit`). The same check is pointed at Go lockgate, which polls every 2 s,
//! and must fail for it.

use std::process::{Command, Stdio};
use std::time::Duration;

use lockgate::kubernetes::{KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireOptions, Locker};
use lockgate_testenv::audit::{self, CountedUser, Counts, Request};
use lockgate_testenv::{
    configmap, expect_stderr_line, go_peer, hold, release, rust_cli, time_limit, wait_for_queue,
    Proc,
};

/// How long the waiters are watched.
const WINDOW: Duration = Duration::from_secs(10);

fn show(who: &str, requests: &[Request]) {
    eprintln!("{who}: {} requests during the wait", requests.len());
    for r in requests {
        eprintln!("  {r}");
    }
}

/// `exec` waiting for `name` on `url` as `user`, with its stderr piped (its waiting line).
fn waiting_exec(program: &std::path::Path, user: &CountedUser, url: &str, name: &str) -> Proc {
    Proc::spawn(
        Command::new(program)
            .args(["exec", "--locker", url, "-w", "120", name, "--", "true"])
            .env("KUBECONFIG", user.kubeconfig())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

/// A waiting `lockgate exec` and a waiting library locker each make one watch and a write per
/// renewal period to keep their place in the queue: no reads while they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_rust_clients_do_not_poll() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let u = url.clone();
    let holder = tokio::task::spawn_blocking(move || hold(&rust_cli(), &u, &[], "busy"))
        .await
        .unwrap();

    // The CLI, as a process.
    let cli_user = CountedUser::take();
    let mut cli = waiting_exec(&rust_cli(), &cli_user, &url, "busy");
    let mut cli = tokio::task::spawn_blocking(move || {
        expect_stderr_line(&mut cli, "lockgate: waiting", Duration::from_secs(60));
        cli
    })
    .await
    .unwrap();
    wait_for_queue(&cm, "busy", 1).await;

    // The library, as an async caller.
    let lib_user = CountedUser::take();
    let config = LeaseConfig::default();
    let l = Locker::new(
        KubernetesLocker::new(
            lib_user.client().await,
            Target::configmap("default", &cm),
            config,
        )
        .unwrap(),
    );
    let lib = tokio::spawn(async move {
        l.acquire("busy", AcquireOptions::exclusive())
            .await
            .map(|g| g.fencing_token())
    });
    wait_for_queue(&cm, "busy", 2).await;

    let from = audit::mark();
    tokio::time::sleep(WINDOW).await;
    let to = audit::mark();
    assert!(!lib.is_finished(), "the library waiter stopped waiting");
    assert!(
        cli.try_wait().unwrap().is_none(),
        "the CLI waiter stopped waiting"
    );

    for (who, user) in [("lockgate exec", &cli_user), ("library", &lib_user)] {
        let requests = user.requests(from, to);
        show(who, &requests);
        let counts = Counts::of(&requests);
        counts
            .check_not_polling(WINDOW, config.renew_period)
            .unwrap_or_else(|e| panic!("{who}: {e}: {counts:?}"));
        assert_eq!(counts.reads, 0, "{who} read the object while waiting");
    }

    tokio::task::spawn_blocking(move || release(holder))
        .await
        .unwrap();
    assert!(
        lib.await.unwrap().unwrap().is_some(),
        "the library waiter got the lock"
    );
    let status = tokio::task::spawn_blocking(move || cli.wait_within(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(status.success(), "the CLI waiter: {status}");
}

/// The check above catches a poller: Go lockgate v0.2.0 waiting for the same kind of lock reads
/// the object every 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_polling_check_catches_go_lockgate() {
    time_limit(Duration::from_secs(120));
    let cm = configmap("default").await;
    let url = format!("kubernetes://default/configmaps/{cm}");
    let u = url.clone();
    let holder = tokio::task::spawn_blocking(move || hold(&rust_cli(), &u, &[], "busy"))
        .await
        .unwrap();
    let user = CountedUser::take();
    let mut go = waiting_exec(&go_peer(), &user, &url, "busy");
    let go = tokio::task::spawn_blocking(move || {
        expect_stderr_line(&mut go, "lockgate-go: waiting", Duration::from_secs(60));
        go
    })
    .await
    .unwrap();

    let from = audit::mark();
    tokio::time::sleep(WINDOW).await;
    let to = audit::mark();
    let requests = user.requests(from, to);
    show("Go lockgate", &requests);
    let counts = Counts::of(&requests);
    let verdict = counts.check_not_polling(WINDOW, LeaseConfig::default().renew_period);
    eprintln!("the check on Go lockgate: {verdict:?}");
    assert!(
        verdict.is_err(),
        "the check let a 2 s poller through: {counts:?}"
    );
    assert!(counts.reads >= 4, "Go polls every 2 s: {counts:?}");

    tokio::task::spawn_blocking(move || release(holder))
        .await
        .unwrap();
    drop(go);
}

/// One uncontended acquire + release of the lock "cycle".
async fn cycle(l: &Locker) {
    l.acquire("cycle", AcquireOptions::exclusive())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// A locker on `target` as the counted `user`, after one cycle: the first cycle reads the
/// object once (to learn the API server's clock), and its hold starts the locker's watch of the
/// object (a list, then the watch). Returns once the audit log shows the watch (bounded), so
/// that neither is counted from then on.
async fn counted_locker(user: &CountedUser, target: Target) -> Locker {
    let l = Locker::new(
        KubernetesLocker::new(user.client().await, target, LeaseConfig::default()).unwrap(),
    );
    let start = audit::mark();
    cycle(&l).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while Counts::of(&user.requests(start, audit::mark())).watches == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the locker's watch never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    l
}

/// The requests of `user` since `from`, once the audit log shows `enough` of them: it records
/// each request as the API server receives it, written by its own backend (waited for,
/// bounded).
async fn counted_since(
    user: &CountedUser,
    from: audit::Mark,
    enough: impl Fn(&Counts) -> bool,
    what: &str,
) -> Counts {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let requests = user.requests(from, audit::mark());
        let counts = Counts::of(&requests);
        if enough(&counts) {
            show(what, &requests);
            return counts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the audit log shows {counts:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An uncontended acquire + release is two requests, one conditional PATCH each, also after
/// the first cycle, when the record the last release left free is there: the acquisition's
/// first guess is that record, not "no record" (which failed its `test` and cost a GET and a
/// second PATCH every cycle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_cycles_make_two_requests_each() {
    time_limit(Duration::from_secs(120));
    const CYCLES: usize = 10;
    let cm = configmap("default").await;
    let user = CountedUser::take();
    let l = counted_locker(&user, Target::configmap("default", &cm)).await;
    let from = audit::mark();
    for _ in 0..CYCLES {
        cycle(&l).await;
    }
    let counts = counted_since(
        &user,
        from,
        |c| c.writes + c.reads >= 2 * CYCLES,
        "uncontended cycles",
    )
    .await;
    assert_eq!(
        (counts.reads, counts.writes),
        (0, 2 * CYCLES),
        "{CYCLES} uncontended cycles: {counts:?}"
    );
}

/// A locker's first guess at a record (what its last release wrote) that another locker has
/// changed since fails its `test`; the change is then read from the locker's own watch, kept
/// since it held the lock, not with a GET: a failed `test`, the grant and the release, three
/// writes and no read. (At most one round in five may read: a watch event later than the
/// 100 ms the acquisition waits for it, on a busy machine. Before the watch was used there,
/// every round read.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_guess_reads_the_change_from_the_lockers_watch() {
    time_limit(Duration::from_secs(120));
    const ROUNDS: usize = 5;
    let cm = configmap("default").await;
    let user = CountedUser::take();
    let target = Target::configmap("default", &cm);
    let counted = counted_locker(&user, target.clone()).await;
    let other = Locker::new(
        KubernetesLocker::new(
            lockgate_testenv::client(false).await,
            target,
            LeaseConfig::default(),
        )
        .unwrap(),
    );
    let from = audit::mark();
    for _ in 0..ROUNDS {
        // The other locker takes and frees the lock: the record is no longer what the counted
        // locker's release wrote.
        cycle(&other).await;
        cycle(&counted).await;
    }
    let counts = counted_since(
        &user,
        from,
        |c| c.writes >= 3 * ROUNDS,
        "cycles after another locker's",
    )
    .await;
    assert_eq!(
        counts.writes,
        3 * ROUNDS,
        "{ROUNDS} rounds of a failed guess, a grant and a release: {counts:?}"
    );
    assert!(
        counts.reads <= 1,
        "a failed first guess read the object instead of taking the change from the watch: \
         {counts:?} in {ROUNDS} rounds"
    );
}
