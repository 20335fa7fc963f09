//go:build lockgate_v01

package main

import (
	"time"

	"github.com/werf/lockgate"
)

// hasV02Features: v0.1.1 has neither acquirer ids (no queue) nor a lock-file GC.
const hasV02Features = false

func setAcquirerID(*lockgate.AcquireOptions, string) error {
	return errNeedsV02("--acquirer-id")
}

func gcLockFiles(string, time.Duration) error {
	return errNeedsV02("gc")
}
