//go:build !lockgate_v01

package main

import (
	"time"

	"github.com/werf/lockgate"
	"github.com/werf/lockgate/pkg/file_lock"
)

// hasV02Features: acquirer ids (the FIFO queue) and the lock-file GC.
const hasV02Features = true

// setAcquirerID puts the caller in v0.2.0's FIFO queue of a Kubernetes or HTTP lock.
func setAcquirerID(opts *lockgate.AcquireOptions, id string) error {
	opts.AcquirerId = id
	return nil
}

// gcLockFiles is v0.2.0's lock-file GC: a file older than minAge is removed if a non-blocking
// exclusive flock on it succeeds.
func gcLockFiles(dir string, minAge time.Duration) error {
	return file_lock.GCLockFileDir(dir, minAge)
}
