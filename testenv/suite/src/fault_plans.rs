//! The catalogue of fault runs: one per fault, a mixed one, and the planted bugs the checker
//! must catch. `tests/fault_runs.rs` runs each briefly; the `faults` binary runs them for longer
//! (`--minutes`) and prints RELIABILITY.md's table.

use std::time::Duration;

use crate::checker::Params;
use crate::fault::{sibling_binary, ClientSpec, Fault, Moment, Net, Plan, ServerSpec};

/// A short Kubernetes lease, so that every fault shows within seconds: TTL 4 s, renewal every
/// 1 s, lost 3 s after the last confirmed renewal was sent, requests time out after 1 s.
pub const SHORT_LEASE: &str = "4000,1000,3000,1000";
/// The default lease (Go lockgate's), for runs with Go peers and `lockgate exec`.
pub const DEFAULT_LEASE: &str = "10000,3000,8000,3000";

const SECOND: Duration = Duration::from_secs(1);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The checker's bounds for a Kubernetes lease of `ttl` renewed every `period`: takeover of a
/// killed holder within PROTOCOL.md's bound (2 TTLs + 1 s after its last renewal, plus 2 s for
/// a loaded machine), and never before its lease could have expired (a TTL after its last
/// renewal, which came at most a renewal period before the fault; less 0.25 s of measuring).
pub fn kube_params(ttl: f64, period: f64) -> Params {
    Params {
        resume_grace: secs(1.5),
        takeover_bound: Some(secs(2.0 * ttl + 1.0 + 2.0)),
        takeover_floor: Some(secs(ttl - period - 0.25)),
    }
}

/// A Kubernetes client with the short lease and the usual work mix.
fn kube(id: &str, extra: &[&str]) -> ClientSpec {
    let mut args = vec!["--lease", SHORT_LEASE, "--hold", "20:300", "--shared", "20"];
    args.extend_from_slice(extra);
    ClientSpec::new(id, "kubernetes", &args)
}

fn kube_default(id: &str, extra: &[&str]) -> ClientSpec {
    let mut args = vec![
        "--lease",
        DEFAULT_LEASE,
        "--hold",
        "20:300",
        "--shared",
        "20",
    ];
    args.extend_from_slice(extra);
    ClientSpec::new(id, "kubernetes", &args)
}

fn go_client(id: &str, peer: &str, extra: &[&str]) -> ClientSpec {
    let peer = crate::required_env(peer);
    let mut args = vec![
        "--peer",
        peer.as_str(),
        "--hold",
        "20:300",
        "--shared",
        "0",
        "--waits",
        "block,timeout",
        "--timeout-ms",
        "5000",
    ];
    args.extend_from_slice(extra);
    let mut c = ClientSpec::new(id, "go", &args);
    c.args = args.iter().map(|s| s.to_string()).collect();
    c
}

fn exec_client(id: &str, extra: &[&str]) -> ClientSpec {
    let cli = sibling_binary("lockgate");
    let mut args = vec!["--cli".to_owned(), cli.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    ClientSpec {
        args,
        ..ClientSpec::new(id, "exec", &[])
    }
}

fn file_client(id: &str, extra: &[&str]) -> ClientSpec {
    let mut args = vec!["--hold", "0:30", "--shared", "20", "--rmw-ms", "15"];
    args.extend_from_slice(extra);
    ClientSpec::new(id, "file", &args)
}

/// Every plan by name, in the order of RELIABILITY.md's table.
pub const NAMES: &[&str] = &[
    "kube-kill",
    "kube-pause",
    "kube-restart-apiserver",
    "kube-restart-etcd",
    "kube-restart-both",
    "kube-black-hole",
    "kube-reply-loss",
    "kube-latency",
    "kube-clock-skew",
    "kube-mixed",
    "go-fleet-kill",
    "go-waiter-skewed-rust-holder",
    "exec-kill",
    "exec-pause",
    "file-kill-tmpfs",
    "file-gc-ext4",
    "http-server-restart",
];

/// The planted-bug runs: the checker must report a violation of the named kind.
pub const PLANTED: &[(&str, crate::checker::Kind)] = &[
    ("planted-short-ttl", crate::checker::Kind::Exclusion),
    ("planted-no-fence", crate::checker::Kind::StaleTokenAccepted),
    ("planted-ignore-lost", crate::checker::Kind::Exclusion),
];

/// True when a plan changes the whole environment (it must run alone).
pub fn exclusive(name: &str) -> bool {
    name.starts_with("kube-restart") || name == "kube-mixed"
}

/// The plan `name`, with its faults repeated `rounds` times.
pub async fn plan(name: &str, rounds: usize) -> Plan {
    let repeat = |faults: Vec<Fault>| -> Vec<Fault> {
        std::iter::repeat_n(faults, rounds.max(1))
            .flatten()
            .collect()
    };
    let cm = || async {
        format!(
            "kubernetes://default/configmaps/{}",
            crate::configmap("default").await
        )
    };
    let short = kube_params(4.0, 1.0);
    let long = kube_params(10.0, 3.0);
    let base =
        |locker: String, clients: Vec<ClientSpec>, faults: Vec<Fault>, params: Params| Plan {
            name: name.to_owned(),
            locker,
            lock: "fault".into(),
            clients,
            warmup: 2 * SECOND,
            faults,
            gap: 5 * SECOND,
            params,
            gc: false,
            server: None,
            stop_within: 30 * SECOND,
            victims: Vec::new(),
        };
    let four = || {
        (0..4)
            .map(|i| kube(&format!("k{i}"), &[]))
            .collect::<Vec<_>>()
    };
    let four_proxied = || {
        (0..4)
            // Holds long enough (4 to 6 s) that a holder cut off at its start loses its lease mid-hold.
            .map(|i| kube(&format!("k{i}"), &["--hold", "4000:6000"]).proxied())
            .collect::<Vec<_>>()
    };
    match name {
        "kube-kill" => base(
            cm().await,
            four(),
            repeat(vec![Fault::Kill(Moment::InHold)]),
            short,
        ),
        "kube-pause" => base(
            cm().await,
            four(),
            repeat(vec![Fault::Pause(Moment::InHold, secs(6.0))]),
            short,
        ),
        "kube-restart-apiserver" | "kube-restart-etcd" | "kube-restart-both" => {
            // Holds long enough (4 to 6 s) that a holder caught by the restart loses its lease mid-hold.
            let what: &'static str = match name {
                "kube-restart-apiserver" => "apiserver",
                "kube-restart-etcd" => "etcd",
                _ => "both",
            };
            let clients = (0..4)
                .map(|i| kube(&format!("k{i}"), &["--hold", "4000:6000"]))
                .collect();
            base(
                cm().await,
                clients,
                repeat(vec![Fault::Restart(what)]),
                short,
            )
        }
        "kube-black-hole" => base(
            cm().await,
            four_proxied(),
            repeat(vec![Fault::Partition(Net::BlackHole, secs(6.0))]),
            short,
        ),
        "kube-reply-loss" => base(
            cm().await,
            four_proxied(),
            repeat(vec![Fault::Partition(Net::LoseReplies, secs(6.0))]),
            short,
        ),
        "kube-latency" => base(
            cm().await,
            four_proxied(),
            // Every reply chunk 0.8 s late, with requests timing out after 1 s.
            repeat(vec![Fault::Everyone(
                Net::Latency(Duration::from_millis(800)),
                secs(6.0),
            )]),
            short,
        ),
        "kube-clock-skew" => base(
            cm().await,
            vec![
                kube("slow", &[]).faketime("-10m"),
                kube("fast", &[]).faketime("+10m"),
                kube("stepped", &[]).faketime("+0"),
                kube("k3", &[]),
            ],
            repeat(vec![
                Fault::Wait(secs(2.0)),
                // A clock stepped back 10 minutes, then forward again, while it works.
                Fault::ClockStep("stepped".into(), "-10m".into()),
                Fault::Kill(Moment::InHold),
                Fault::ClockStep("stepped".into(), "+0".into()),
            ]),
            short,
        ),
        "kube-mixed" => {
            // The short version (one round, for the test suite): four faults; longer runs
            // cycle through all of them.
            let faults = if rounds <= 1 {
                vec![
                    Fault::Kill(Moment::InHold),
                    Fault::Pause(Moment::InHold, secs(5.0)),
                    Fault::Partition(Net::BlackHole, secs(5.0)),
                    Fault::Restart("apiserver"),
                ]
            } else {
                repeat(vec![
                    Fault::Kill(Moment::InHold),
                    Fault::Pause(Moment::InHold, secs(6.0)),
                    Fault::Partition(Net::BlackHole, secs(6.0)),
                    Fault::Partition(Net::LoseReplies, secs(6.0)),
                    Fault::Restart("apiserver"),
                    Fault::Everyone(Net::Latency(Duration::from_millis(800)), secs(4.0)),
                    Fault::Restart("etcd"),
                ])
            };
            let mut p = base(cm().await, four_proxied(), faults, short);
            p.gap = 4 * SECOND;
            p
        }
        "go-fleet-kill" => {
            let mut p = base(
                cm().await,
                vec![
                    kube_default("r0", &[]),
                    kube_default("r1", &[]),
                    go_client("g0", "LOCKGATE_TEST_GO_PEER", &[]),
                    go_client("g1", "LOCKGATE_TEST_GO_PEER_V01", &[]),
                ],
                repeat(vec![Fault::Kill(Moment::InHold)]),
                long,
            );
            p.gap = 14 * SECOND;
            p
        }
        "go-waiter-skewed-rust-holder" => {
            // A Rust holder whose clock is 10 minutes slow, Go waiters with correct clocks: the
            // Go waiters must wait for its release (its record's expiry is in the API server's
            // time), not take it over.
            let mut p = base(
                cm().await,
                vec![
                    ClientSpec::new(
                        "slow",
                        "kubernetes",
                        &[
                            "--lease",
                            DEFAULT_LEASE,
                            "--hold",
                            "1000:4000",
                            "--shared",
                            "0",
                            "--waits",
                            "block",
                        ],
                    )
                    .faketime("-10m"),
                    go_client("g0", "LOCKGATE_TEST_GO_PEER", &["--waits", "block"]),
                    go_client("g1", "LOCKGATE_TEST_GO_PEER_V01", &["--waits", "block"]),
                ],
                repeat(vec![Fault::Wait(secs(20.0))]),
                long,
            );
            p.gap = SECOND;
            p
        }
        "exec-kill" => {
            let mut p = base(
                cm().await,
                vec![
                    exec_client(
                        "e0",
                        &["--hold", "1000:3000", "--shared", "0", "--waits", "block"],
                    ),
                    exec_client(
                        "e1",
                        &["--hold", "1000:3000", "--shared", "0", "--waits", "block"],
                    ),
                    kube_default("r0", &[]),
                ],
                repeat(vec![Fault::Kill(Moment::InHold)]),
                long,
            );
            p.gap = 14 * SECOND;
            p.victims = vec!["e0".into(), "e1".into()];
            p
        }
        "exec-pause" | "planted-no-fence" => {
            // `lockgate exec` paused (SIGSTOP) for 15 s while its command keeps writing the
            // register every 100 ms with LOCKGATE_FENCING_TOKEN: after another holder took over,
            // the register must refuse the command's writes.
            let mut extra = vec!["--hold", "12000:13000", "--shared", "0", "--waits", "block"];
            if name == "planted-no-fence" {
                extra.push("--no-fence");
            }
            let mut p = base(
                cm().await,
                vec![
                    exec_client("e0", &extra),
                    kube_default("r0", &["--shared", "0"]),
                    kube_default("r1", &["--shared", "0"]),
                ],
                repeat(vec![Fault::Pause(Moment::InHold, secs(15.0))]),
                long,
            );
            p.gap = 2 * SECOND;
            p.victims = vec!["e0".into()];
            p
        }
        "file-kill-tmpfs" | "file-gc-ext4" => {
            let gc = name == "file-gc-ext4";
            let root = if gc {
                std::env::temp_dir()
            } else {
                "/dev/shm".into()
            };
            let dir = tempfile::Builder::new()
                .prefix("lockgate-fault-locks-")
                .tempdir_in(&root)
                .expect("a lock directory")
                .keep();
            let magic = fs_magic(&dir);
            let want = if gc { 0xEF53 } else { 0x0102_1994 };
            assert_eq!(
                magic,
                want,
                "{} is not on {}",
                dir.display(),
                if gc { "ext4" } else { "tmpfs" }
            );
            let mut clients: Vec<ClientSpec> =
                (0..4).map(|i| file_client(&format!("f{i}"), &[])).collect();
            // Go peers share file locks too; v0.2 checks the link count after locking, which
            // is what makes collection safe (v0.1.1 does not: see PROTOCOL.md).
            clients.push(go_client(
                "g0",
                if gc {
                    "LOCKGATE_TEST_GO_PEER"
                } else {
                    "LOCKGATE_TEST_GO_PEER_V01"
                },
                &["--hold", "0:30"],
            ));
            let mut p = base(
                format!("file:{}", dir.display()),
                clients,
                repeat(vec![
                    Fault::Kill(Moment::MidWrite),
                    Fault::Kill(Moment::MidWrite),
                ]),
                Params {
                    resume_grace: secs(1.5),
                    takeover_bound: Some(secs(3.0)),
                    takeover_floor: None,
                },
            );
            p.gap = 2 * SECOND;
            p.gc = gc;
            p
        }
        "http-server-restart" => {
            let clients = (0..4)
                .map(|i| {
                    ClientSpec::new(
                        &format!("h{i}"),
                        "http",
                        &[
                            "--lease",
                            SHORT_LEASE,
                            "--hold",
                            "4000:6000",
                            "--shared",
                            "20",
                        ],
                    )
                })
                .collect();
            let mut p = base(
                String::new(),
                clients,
                repeat(vec![Fault::RestartServer, Fault::Kill(Moment::InHold)]),
                Params {
                    resume_grace: secs(1.5),
                    takeover_bound: Some(secs(4.0 + 2.0)),
                    takeover_floor: Some(secs(4.0 - 1.0 - 0.25)),
                },
            );
            p.server = Some(ServerSpec { ttl: "4s".into() });
            p.gap = 6 * SECOND;
            p
        }
        "planted-short-ttl" => {
            // Everyone renews every 3 s with a 10 s TTL, one client believes the TTL is 2.5 s:
            // it takes over leases that stood still between two renewals. It only ever waits
            // without a limit: a 2 s timed wait or a single try gives up before 2.5 s, and a
            // run where it happened to draw those (or was handed each lock by a release before
            // 2.5 s passed) took nothing over.
            let mut clients: Vec<ClientSpec> = (0..3)
                .map(|i| kube_default(&format!("r{i}"), &["--hold", "3000:5000", "--shared", "0"]))
                .collect();
            clients.push(ClientSpec::new(
                "short-ttl",
                "kubernetes",
                &[
                    "--lease",
                    "2500,1000,1500,500",
                    "--hold",
                    "100:300",
                    "--shared",
                    "0",
                    "--waits",
                    "block",
                ],
            ));
            base(
                cm().await,
                clients,
                repeat(vec![Fault::Wait(secs(8.0))]),
                long,
            )
        }
        "planted-ignore-lost" => {
            // The only proxied client ignores its lost-lease signal and keeps working through
            // long holds; it is cut off mid-hold.
            let mut clients = vec![kube(
                "deaf",
                &[
                    "--hold",
                    "6000:7000",
                    "--shared",
                    "0",
                    "--ignore-lost",
                    "--waits",
                    "block",
                ],
            )
            .proxied()];
            clients.extend((0..3).map(|i| kube(&format!("k{i}"), &["--shared", "0"])));
            let mut p = base(
                cm().await,
                clients,
                repeat(vec![Fault::Partition(Net::BlackHole, secs(6.0))]),
                short,
            );
            p.gap = 2 * SECOND;
            p
        }
        other => panic!("no fault plan named {other:?}; known: {NAMES:?} and the planted ones"),
    }
}

fn fs_magic(path: &std::path::Path) -> i64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs with a valid path and buffer.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    st.f_type as i64
}
