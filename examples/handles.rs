//! The handle API: locks that cross boundaries a guard cannot (an RPC, a job queue, FFI), as Go
//! lockgate's `Acquire`/`Release` with a `LockHandle`.
//!
//! ```sh
//! cargo run --example handles
//! ```
//!
//! `Locker::acquire_handle` keeps the lock inside the locker and returns a `LockHandle`, which
//! serializes as Go's `{"uuid": ..., "lockName": ...}`; `Locker::release` takes it back. Locks
//! live in `$LOCKGATE_DIR`, else in a fresh directory of this process. `cargo test` runs this
//! program too.

use std::path::PathBuf;

use lockgate::{AcquireOptions, Error, FileLocker, LockHandle, Locker};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::var_os("LOCKGATE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("lockgate-example-{}", std::process::id())),
    };
    let locker = Locker::new(FileLocker::new(&dir)?);

    // Acquire: the guard stays in the locker; we get a plain value back.
    let handle = locker.acquire_handle_blocking("deploy", AcquireOptions::exclusive())?;
    let wire = serde_json::to_string(&handle)?;
    println!("acquired, handle {wire}");

    // The handle travels (here: through JSON, as it would through an RPC or a job queue) ...
    let received: LockHandle = serde_json::from_str(&wire)?;

    // ... while the lock stays held: nobody else gets it.
    let busy = locker.acquire_blocking("deploy", AcquireOptions::exclusive().non_blocking());
    if busy.is_ok() {
        return Err("a lock held through a handle was acquired again".into());
    }
    println!("held: another acquisition is refused");

    // Release through the handle that came back.
    locker.release_blocking(&received)?;
    println!("released through the handle");

    // A handle is good for one release: a second one is an error that names the handle.
    match locker.release_blocking(&received) {
        Err(e @ Error::UnknownHandle { .. }) => println!("released twice: {e}"),
        other => return Err(format!("a second release answered {other:?}").into()),
    }

    // The lock is free again.
    drop(locker.acquire_blocking("deploy", AcquireOptions::exclusive().non_blocking())?);
    println!("free again");

    if std::env::var_os("LOCKGATE_DIR").is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
