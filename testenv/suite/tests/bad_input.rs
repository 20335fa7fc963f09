//! Bad input, a catalogue: records other tools wrote, objects changed or taken away under a
//! holder, lock paths that are not lock files. Each case gets a typed error or a lost-lease
//! signal, never a panic or a hang, and the other locks on the same object or directory are
//! untouched.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use lockgate::kubernetes::{annotation_key, KubernetesLocker, LeaseConfig, Target};
use lockgate::{AcquireError, AcquireOptions, Error, FileLocker, LockGuard, Locker, LostReason};
use lockgate_testenv::{client, configmap, required_env, unique};
use serde_json::json;

const SHORT: LeaseConfig = LeaseConfig {
    ttl: Duration::from_secs(4),
    renew_period: Duration::from_secs(1),
    renew_deadline: Duration::from_secs(3),
    request_timeout: Duration::from_secs(1),
};

async fn locker_on(client: kube::Client, ns: &str, cm: &str) -> Locker {
    Locker::new(KubernetesLocker::new(client, Target::configmap(ns, cm), SHORT).unwrap())
}

async fn cms(ns: &str) -> Api<ConfigMap> {
    Api::namespaced(client(false).await, ns)
}

async fn annotation(ns: &str, cm: &str, key: &str) -> Option<String> {
    cms(ns)
        .await
        .get(cm)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
        .remove(key)
}

/// `kubectl annotate --overwrite` (a merge patch): `value` `None` removes the annotation.
async fn annotate(ns: &str, cm: &str, key: &str, value: Option<&str>) {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    cms(ns)
        .await
        .patch(cm, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// A held lock and a free one on the same object, to show that nothing else is touched.
struct Bystanders {
    locker: Locker,
    held: LockGuard,
}

impl Bystanders {
    async fn new(ns: &str, cm: &str) -> Self {
        let locker = locker_on(client(false).await, ns, cm).await;
        let held = locker
            .acquire("bystander-held", AcquireOptions::exclusive())
            .await
            .unwrap();
        Self { locker, held }
    }

    /// The held lock is still held (not lost, still renewed) and a free one can be taken.
    async fn untouched(self) {
        assert!(!self.held.is_lost(), "a bystander's lease was lost");
        self.locker
            .acquire("bystander-free", AcquireOptions::exclusive().non_blocking())
            .await
            .expect("a free lock on the same object")
            .release()
            .await
            .unwrap();
        self.held.release().await.expect("the bystander releases");
    }
}

/// A record another tool wrote as the annotation of lock "victim": what a non-blocking
/// exclusive acquisition of it does. The record is never overwritten when it is not a record,
/// and the bystanders are untouched.
async fn foreign_record(value: &str) -> Result<LockGuard, AcquireError> {
    let cm = configmap("default").await;
    let by = Bystanders::new("default", &cm).await;
    let key = annotation_key("victim");
    annotate("default", &cm, &key, Some(value)).await;
    let locker = locker_on(client(false).await, "default", &cm).await;
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        locker.acquire("victim", AcquireOptions::exclusive().non_blocking()),
    )
    .await
    .expect("an acquisition of a foreign record hangs");
    if let Err(AcquireError::Failed(Error::CorruptRecord { key: k, .. })) = &got {
        assert_eq!(k, &key);
        assert_eq!(
            annotation("default", &cm, &key).await.as_deref(),
            Some(value),
            "a corrupt record was overwritten"
        );
    }
    by.untouched().await;
    got
}

fn corrupt(r: Result<LockGuard, AcquireError>) {
    match r {
        Err(AcquireError::Failed(Error::CorruptRecord { .. })) => {}
        other => panic!("expected CorruptRecord, got {other:?}"),
    }
}

fn busy(r: Result<LockGuard, AcquireError>) {
    match r {
        Err(AcquireError::WouldBlock { .. }) => {}
        other => panic!("expected WouldBlock, got {other:?}"),
    }
}

fn record(fields: serde_json::Value) -> String {
    let mut r = json!({"uuid": "3f1c2a9b-0000-4000-8000-000000000001", "lockName": "victim",
        "ExpireAtTimestamp": now() + 600, "SharedHoldersCount": 1, "IsShared": false, "QueueMembers": {}});
    for (k, v) in fields.as_object().unwrap() {
        if v.is_null() {
            r.as_object_mut().unwrap().remove(k);
        } else {
            r[k] = v.clone();
        }
    }
    r.to_string()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

macro_rules! corrupt_records {
    ($($test:ident => $value:expr),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let value: String = $value;
            corrupt(foreign_record(&value).await);
        }
    )*};
}

corrupt_records! {
    record_not_json => "{not json".to_owned(),
    record_empty_string => String::new(),
    record_json_array => "[1,2,3]".to_owned(),
    record_json_string => "\"a lock\"".to_owned(),
    record_json_null => "null".to_owned(),
    record_uuid_a_number => record(json!({"uuid": 5})),
    record_expiry_a_string => record(json!({"ExpireAtTimestamp": "soon"})),
    record_count_a_string => record(json!({"SharedHoldersCount": "1"})),
    record_count_a_float => record(json!({"SharedHoldersCount": 1.5})),
    record_count_beyond_i64 => record(json!({"SharedHoldersCount": 18446744073709551615u64})),
    record_shared_flag_a_string => record(json!({"IsShared": "yes"})),
    record_missing_uuid => record(json!({"uuid": null})),
    record_missing_expiry => record(json!({"ExpireAtTimestamp": null})),
    record_missing_count => record(json!({"SharedHoldersCount": null})),
    record_queue_a_list => record(json!({"QueueMembers": ["a", "b"]})),
    record_queue_member_without_fields => record(json!({"QueueMembers": {"x": {"AcquirerId": "x"}}})),
    record_nested_ten_thousand_deep => record(json!({"Extra": "X"})).replace("\"X\"", &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
    record_garbage_of_200_kib => "x".repeat(200 * 1024),
    record_with_a_byte_order_mark => format!("\u{feff}{}", record(json!({}))),
}

/// Records that parse but hold odd values: never a panic (overflow included), and exclusion
/// kept where the record may be a live lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_negative_count_counts_as_free() {
    let g = foreign_record(&record(json!({"SharedHoldersCount": -5})))
        .await
        .expect("a count below zero is a free record");
    g.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_huge_count_is_busy() {
    busy(foreign_record(&record(json!({"SharedHoldersCount": i64::MAX}))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_expiry_at_the_end_of_time_is_busy() {
    busy(foreign_record(&record(json!({"ExpireAtTimestamp": i64::MAX}))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_expiry_at_the_start_of_time_is_taken_over() {
    let g = foreign_record(&record(json!({"ExpireAtTimestamp": i64::MIN})))
        .await
        .expect("expired long ago by the API server's clock");
    g.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_with_an_empty_uuid_is_busy_while_live() {
    busy(foreign_record(&record(json!({"uuid": ""}))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_whose_lock_name_does_not_match_its_key_is_busy_while_live() {
    busy(foreign_record(&record(json!({"lockName": "another lock"}))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_with_a_duplicated_field_is_an_error_or_a_lock() {
    let dup = record(json!({})).replacen('{', "{\"uuid\":\"first\",", 1);
    match foreign_record(&dup).await {
        Err(AcquireError::Failed(Error::CorruptRecord { .. }))
        | Err(AcquireError::WouldBlock { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// A valid, expired record carrying 200 KiB of a field lockgate does not know: taken over, the
/// field kept as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_with_200_kib_of_unknown_field_is_kept_whole() {
    let big = "y".repeat(200 * 1024);
    let value = record(json!({"ExpireAtTimestamp": 1, "Blob": big}));
    let cm = configmap("default").await;
    let key = annotation_key("victim");
    annotate("default", &cm, &key, Some(&value)).await;
    let locker = locker_on(client(false).await, "default", &cm).await;
    let g = locker
        .acquire("victim", AcquireOptions::exclusive().non_blocking())
        .await
        .expect("an expired record is taken over");
    let now: serde_json::Value =
        serde_json::from_str(&annotation("default", &cm, &key).await.unwrap()).unwrap();
    assert_eq!(now["Blob"].as_str().map(str::len), Some(big.len()));
    g.release().await.unwrap();
}

/// A holder releases its lock even when another tool has filled the object's annotations
/// meanwhile: the release does not grow the record (a free record with a holder mark would not
/// fit, and the lock stayed held until its lease expired). Failed before the fix with
/// `AnnotationsFull` from `release`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_released_when_the_annotations_are_full() {
    let cm = configmap("default").await;
    let locker = locker_on(client(false).await, "default", &cm).await;
    let held = locker
        .acquire("victim", AcquireOptions::exclusive())
        .await
        .unwrap();
    fill_annotations(&cm).await;
    held.release().await.expect("released in a full object");
    // Free at once, not after a TTL.
    let other = locker_on(client(false).await, "default", &cm).await;
    other
        .acquire("victim", AcquireOptions::exclusive().non_blocking())
        .await
        .expect("free after the release")
        .release()
        .await
        .unwrap();
}

/// Fills the object's annotations (256 KiB for keys and values together) to 100 bytes short
/// of the limit: no new lock record fits.
async fn fill_annotations(cm: &str) {
    let used: usize = cms("default")
        .await
        .get(cm)
        .await
        .unwrap()
        .metadata
        .annotations
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    let key = "example.com/big";
    let room = 256 * 1024 - used - key.len() - 100;
    annotate("default", cm, key, Some(&"z".repeat(room))).await;
}

/// The object's annotations are full (another tool's 250 KiB): a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_annotations_are_a_typed_error() {
    let cm = configmap("default").await;
    let by = Bystanders::new("default", &cm).await;
    // The bystanders' free lock has its record before the object fills up.
    by.locker
        .acquire("bystander-free", AcquireOptions::exclusive())
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    fill_annotations(&cm).await;
    let locker = locker_on(client(false).await, "default", &cm).await;
    match locker
        .acquire("victim", AcquireOptions::exclusive().non_blocking())
        .await
    {
        Err(AcquireError::Failed(Error::AnnotationsFull { .. })) => {}
        other => panic!("expected AnnotationsFull, got {other:?}"),
    }
    by.untouched().await;
}

// ---------------------------------------------------------------------------------------------
// Changed or taken away while held

/// Holds "victim" (short lease) next to the bystanders, does `change`, and expects the lost
/// signal within the renewal deadline and a little.
async fn lost_when(
    ns: &str,
    cm: &str,
    change: impl std::future::Future<Output = ()>,
) -> LostReason {
    let locker = locker_on(client(false).await, ns, cm).await;
    let g = locker
        .acquire("victim", AcquireOptions::exclusive())
        .await
        .unwrap();
    change.await;
    let reason = tokio::time::timeout(Duration::from_secs(6), g.lost())
        .await
        .expect("no lost signal within 6 s");
    assert!(matches!(g.release().await, Err(Error::LeaseLost { .. })));
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_removed_while_held_is_a_lost_lease() {
    let cm = configmap("default").await;
    let by = Bystanders::new("default", &cm).await;
    let key = annotation_key("victim");
    let reason = lost_when("default", &cm, annotate("default", &cm, &key, None)).await;
    assert_eq!(reason, LostReason::Taken);
    by.untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_overwritten_while_held_is_a_lost_lease() {
    let cm = configmap("default").await;
    let by = Bystanders::new("default", &cm).await;
    let key = annotation_key("victim");
    let reason = lost_when(
        "default",
        &cm,
        annotate("default", &cm, &key, Some("overwritten by kubectl")),
    )
    .await;
    assert_eq!(reason, LostReason::Taken);
    by.untouched().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_deleted_while_held_is_a_lost_lease() {
    let cm = configmap("default").await;
    let (c, n) = (cm.clone(), cm.clone());
    let delete = async move {
        cms("default")
            .await
            .delete(&c, &DeleteParams::default())
            .await
            .unwrap();
    };
    lost_when("default", &n, delete).await;
    // Gone: a typed error, no panic.
    let locker = locker_on(client(false).await, "default", &cm).await;
    match locker
        .acquire("other", AcquireOptions::exclusive().non_blocking())
        .await
    {
        Err(AcquireError::Failed(Error::ResourceMissing { .. })) => {}
        other => panic!("expected ResourceMissing, got {other:?}"),
    }
}

/// A client of the admin's that impersonates `user` (the API server checks RBAC as that user).
async fn impersonating(user: &str) -> kube::Client {
    let path = required_env("LOCKGATE_TEST_KUBECONFIG");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(user.to_owned());
    lockgate::kubernetes::client_from_config(config, Duration::from_secs(5)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_revoked_while_held_is_a_lost_lease_then_forbidden() {
    let cm = configmap("default").await;
    let user = unique("revoked");
    let admin = client(false).await;
    let roles: Api<Role> = Api::namespaced(admin.clone(), "default");
    let bindings: Api<RoleBinding> = Api::namespaced(admin, "default");
    let role = Role {
        metadata: kube::api::ObjectMeta {
            name: Some(user.clone()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![cm.clone()]),
            verbs: ["get", "list", "watch", "patch", "update"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        }]),
    };
    roles.create(&PostParams::default(), &role).await.unwrap();
    let binding = RoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(user.clone()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: user.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            name: user.clone(),
            ..Default::default()
        }]),
    };
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let by = Bystanders::new("default", &cm).await;
    let locker = locker_on(impersonating(&user).await, "default", &cm).await;
    let g = locker
        .acquire("victim", AcquireOptions::exclusive())
        .await
        .expect("allowed before the revocation");
    bindings
        .delete(&user, &DeleteParams::default())
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(6), g.lost())
        .await
        .expect("no lost signal after RBAC was revoked");
    assert_eq!(reason, LostReason::RenewalFailed);
    drop(g);
    match locker
        .acquire("another", AcquireOptions::exclusive().non_blocking())
        .await
    {
        Err(AcquireError::Failed(Error::Forbidden { .. })) => {}
        other => panic!("expected Forbidden, got {other:?}"),
    }
    by.untouched().await;
}

/// A namespace deleted while a lock is held in it: with no controller-manager it stays
/// Terminating and its objects stay. The API server still accepts patches of existing objects
/// (the holder keeps its lease, others lock as before) but refuses to create any: a locker that
/// would create a missing ConfigMap there gets a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_deleted_while_held_keeps_existing_objects_working() {
    let ns = unique("doomed");
    let namespaces: Api<Namespace> = Api::all(client(false).await);
    let meta = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(ns.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &meta)
        .await
        .unwrap();
    let cm = configmap(&ns).await;
    let by = Bystanders::new(&ns, &cm).await;
    let locker = locker_on(client(false).await, &ns, &cm).await;
    let g = locker
        .acquire("victim", AcquireOptions::exclusive())
        .await
        .unwrap();
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    let phase = namespaces
        .get(&ns)
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase);
    assert_eq!(phase.as_deref(), Some("Terminating"));
    // Renewed through several periods after the deletion.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !g.is_lost(),
        "the lease was lost in a terminating namespace"
    );
    g.release().await.unwrap();
    by.untouched().await;
    let creating = KubernetesLocker::new(
        client(false).await,
        Target::configmap(ns.as_str(), unique("new")),
        SHORT,
    )
    .unwrap()
    .create_missing(true);
    match Locker::new(creating)
        .acquire("x", AcquireOptions::exclusive().non_blocking())
        .await
    {
        Err(AcquireError::Failed(Error::Forbidden { .. })) => {}
        other => panic!("expected Forbidden (namespace terminating), got {other:?}"),
    }
}

/// 300 field managers' entries in managedFields (each `kubectl` variant, each tool that ever
/// patched the object adds one): locks still work, each acquisition and release in well under
/// a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_fields_bloat_does_not_slow_locks_down() {
    let cm = configmap("default").await;
    let api = cms("default").await;
    for i in 0..300 {
        let patch =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {format!("k{i}"): "v"}});
        api.patch(
            &cm,
            &PatchParams::apply(&format!("manager-{i}")).force(),
            &Patch::Apply(patch),
        )
        .await
        .unwrap();
    }
    let managers = api
        .get(&cm)
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap()
        .len();
    assert!(managers >= 300, "{managers} managers");
    let locker = locker_on(client(false).await, "default", &cm).await;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        locker
            .acquire("victim", AcquireOptions::exclusive().non_blocking())
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Lock paths that are not lock files

fn file_locker() -> (tempfile::TempDir, FileLocker) {
    let dir = tempfile::tempdir().unwrap();
    let locker = FileLocker::new(dir.path()).unwrap();
    (dir, locker)
}

/// What acquiring "victim" does when `plant` put something at its path; a bystander lock in
/// the same directory, held throughout, is untouched and another is free.
fn planted(plant: impl FnOnce(&Path)) -> Result<LockGuard, AcquireError> {
    let (dir, fl) = file_locker();
    let path = fl.lock_path(&lockgate::LockName::new("victim").unwrap());
    let locker = Locker::new(fl);
    let held = locker
        .acquire_blocking("bystander", AcquireOptions::exclusive())
        .unwrap();
    plant(&path);
    let got = locker.acquire_blocking(
        "victim",
        AcquireOptions::exclusive().timeout(Duration::from_secs(2)),
    );
    assert!(
        matches!(
            locker.acquire_blocking("bystander", AcquireOptions::exclusive().non_blocking()),
            Err(AcquireError::WouldBlock { .. })
        ),
        "the bystander lost its lock"
    );
    drop(held);
    // Free again once released: waited for (bounded), since a process another test of this
    // binary forks at that moment holds a copy of the lock file's descriptor, and with it the
    // flock, until it execs (`O_CLOEXEC` closes it only then).
    drop(
        locker
            .acquire_blocking(
                "bystander",
                AcquireOptions::exclusive().timeout(Duration::from_secs(5)),
            )
            .expect("the bystander is free again"),
    );
    drop(dir);
    got
}

fn not_regular(r: Result<LockGuard, AcquireError>) {
    match r {
        Err(AcquireError::Failed(Error::NotARegularFile { .. })) => {}
        other => panic!("expected NotARegularFile, got {other:?}"),
    }
}

#[test]
fn lock_path_is_a_directory() {
    not_regular(planted(|p| std::fs::create_dir(p).unwrap()));
}

#[test]
fn lock_path_is_a_fifo() {
    not_regular(planted(|p| {
        let c = std::ffi::CString::new(p.as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }));
}

#[test]
fn lock_path_is_a_socket() {
    let r = planted(|p| {
        std::mem::forget(std::os::unix::net::UnixListener::bind(p).unwrap());
    });
    match r {
        Err(AcquireError::Failed(Error::NotARegularFile { .. } | Error::LockFile { .. })) => {}
        other => panic!("expected a typed error, got {other:?}"),
    }
}

#[test]
fn lock_path_is_a_device() {
    not_regular(planted(|p| {
        let c = std::ffi::CString::new(p.as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: mknod of /dev/null's numbers (1, 3) with a valid path; the tests run as root.
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
        assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    }));
}

#[test]
fn lock_path_is_a_symlink_loop() {
    let r = planted(|p| std::os::unix::fs::symlink(p, p).unwrap());
    match r {
        Err(AcquireError::Failed(Error::SymlinkAtLockPath { .. })) => {}
        other => panic!("expected SymlinkAtLockPath, got {other:?}"),
    }
}

#[test]
fn lock_path_is_a_symlink_to_a_real_file() {
    let target = tempfile::NamedTempFile::new().unwrap();
    let t = target.path().to_owned();
    let r = planted(move |p| std::os::unix::fs::symlink(&t, p).unwrap());
    match r {
        Err(AcquireError::Failed(Error::SymlinkAtLockPath { .. })) => {}
        other => panic!("expected SymlinkAtLockPath, got {other:?}"),
    }
}

#[test]
fn lock_directory_is_a_file() {
    let f = tempfile::NamedTempFile::new().unwrap();
    assert!(matches!(
        FileLocker::new(f.path()),
        Err(Error::NotADirectory { .. })
    ));
}

#[test]
fn lock_directory_removed_while_held() {
    let (dir, fl) = file_locker();
    let locker = Locker::new(fl);
    let held = locker
        .acquire_blocking("victim", AcquireOptions::exclusive())
        .unwrap();
    std::fs::remove_dir_all(dir.path()).unwrap();
    match locker.acquire_blocking("another", AcquireOptions::exclusive().non_blocking()) {
        Err(AcquireError::Failed(Error::LockDir { .. })) => {}
        other => panic!("expected LockDir, got {other:?}"),
    }
    // The held lock is released as usual (closing its file).
    held.release_blocking().unwrap();
}

/// Runs the `lockgate` CLI as `nobody`: root can open anything, so file permissions only show
/// for another user.
fn cli_as_nobody(dir: &Path, name: &str) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(lockgate_testenv::rust_cli())
        .arg("--dir")
        .arg(dir)
        .args(["exec", "-n", name, "--", "true"])
        .output()
        .expect("setpriv")
}

fn nobody() -> (u32, u32) {
    // SAFETY: getpwnam with a NUL-terminated name; reads the static result at once.
    unsafe {
        let pw = libc::getpwnam(c"nobody".as_ptr());
        assert!(!pw.is_null(), "no user nobody");
        ((*pw).pw_uid, (*pw).pw_gid)
    }
}

/// A lock file of another user that this user may not open: exit 69 naming the file, and the
/// other locks of the directory still work.
#[test]
fn lock_file_of_another_user() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let fl = FileLocker::new(dir.path()).unwrap();
    let path = fl.lock_path(&lockgate::LockName::new("victim").unwrap());
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = cli_as_nobody(dir.path(), "victim");
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&*path.to_string_lossy()),
        "{out:?}"
    );
    let out = cli_as_nobody(dir.path(), "bystander");
    assert!(out.status.success(), "{out:?}");
}

/// The directory made read-only while a lock is held: new lock files cannot be made (exit 69,
/// the directory named); existing ones still lock; the held lock is unaffected.
#[test]
fn lock_directory_made_read_only_while_held() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, gid) = nobody();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    assert!(cli_as_nobody(dir.path(), "existing").status.success());
    let mut holder = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(lockgate_testenv::rust_cli())
        .arg("--dir")
        .arg(dir.path())
        .args([
            "exec",
            "held",
            "--",
            "sh",
            "-c",
            "echo locked; read _ || true",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    lockgate_testenv::expect_line(&mut holder, "locked");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let out = cli_as_nobody(dir.path(), "brand-new");
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(cli_as_nobody(dir.path(), "existing").status.success());
    assert_eq!(
        cli_as_nobody(dir.path(), "held").status.code(),
        Some(1),
        "held is busy"
    );
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}
