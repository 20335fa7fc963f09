// Command lockgate-go drives the real Go lockgate (github.com/werf/lockgate) with the same
// command-line shape as the Rust lockgate, so that one test can run either implementation
// against the other. It is a test peer, not part of the product. One source tree builds two
// peers: v0.2.0 (go.mod, what werf v2 requires) and v0.1.1 (go.v0.1.1.mod with the build tag
// lockgate_v01, what older werf and nelm releases pin).
//
//	lockgate-go version
//	lockgate-go exec --locker LOCKER [-s] [-n] [-w SECS] [--acquirer-id ID|auto] NAME -- COMMAND [ARGS...]
//	lockgate-go loop --locker LOCKER [-s] [-w SECS] [--acquirer-id ID|auto] --cycles N --counter FILE [--hold-ms MS] NAME
//	lockgate-go gc --locker file:DIR --min-age SECS [--loop] [--interval-ms MS]
//	lockgate-go serve --listen ADDR [--store memory|kubernetes://NAMESPACE/RESOURCE/NAME]
//	lockgate-go bench --locker LOCKER [-s] [--iterations N] [--name NAME] [--ready]
//	lockgate-go bench-wait --locker LOCKER [-s] [--name NAME]
//	lockgate-go bench-hold --locker LOCKER [-s] [--name NAME]
//
// LOCKER is file:DIR, kubernetes://NAMESPACE/RESOURCE/NAME (with KUBECONFIG; an empty
// NAMESPACE means cluster-scoped) or http://HOST:PORT. Kubernetes clients run without
// client-go's rate limiter (QPS 1000, burst 2000) unless --client-go-defaults keeps client-go's
// own (QPS 5, burst 10). --acquirer-id and gc need v0.2.0: the v0.1.1 peer refuses them
// (exit 64). Exit codes follow flock(1): the command's status, 1 when the lock is busy or the
// timeout passed, 64 for usage errors, 69 for other lock errors.
package main

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/werf/lockgate"
	"github.com/werf/lockgate/pkg/distributed_locker"
	"github.com/werf/lockgate/pkg/distributed_locker/optimistic_locking_store"
	"github.com/werf/lockgate/pkg/file_locker"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
)

const (
	exitConflict    = 1
	exitUsage       = 64
	exitUnavailable = 69
)

const lockgateModule = "github.com/werf/lockgate"

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "lockgate-go: "+format+"\n", args...)
	os.Exit(code)
}

// errNeedsV02 is what the v0.1.1 peer answers to a feature that only v0.2.0 has.
func errNeedsV02(feature string) error {
	return fmt.Errorf("%s needs Go lockgate v0.2.0 or later; this peer is built with %s", feature, lockgateVersion())
}

func main() {
	if len(os.Args) < 2 {
		fail(exitUsage, "usage: lockgate-go version|exec|loop|gc|serve|bench|bench-wait|bench-hold ...")
	}
	switch os.Args[1] {
	case "version":
		fmt.Println(lockgateVersion())
	case "exec":
		execCmd(os.Args[2:])
	case "loop":
		loopCmd(os.Args[2:])
	case "gc":
		gcCmd(os.Args[2:])
	case "serve":
		serveCmd(os.Args[2:])
	case "bench":
		benchCmd(os.Args[2:])
	case "bench-wait":
		benchWaitCmd(os.Args[2:])
	case "bench-hold":
		benchHoldCmd(os.Args[2:])
	default:
		fail(exitUsage, "unknown command %q", os.Args[1])
	}
}

// lockgateVersion is the version of github.com/werf/lockgate this binary was linked with, as the
// Go toolchain recorded it.
func lockgateVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == lockgateModule {
				if dep.Replace != nil {
					return dep.Replace.Version
				}
				return dep.Version
			}
		}
	}
	return "unknown"
}

// clientGoDefaults keeps client-go's own rate limiter (QPS 5, burst 10) instead of lifting it.
var clientGoDefaults bool

func registerClientFlags(fs *flag.FlagSet) {
	fs.BoolVar(&clientGoDefaults, "client-go-defaults", false,
		"keep client-go's default rate limiter (QPS 5, burst 10) instead of QPS 1000, burst 2000")
}

// kubeTarget is one Kubernetes object whose annotations hold locks.
type kubeTarget struct {
	client    dynamic.Interface
	gvr       schema.GroupVersionResource
	name      string
	namespace string
}

// newKubeTarget resolves kubernetes://NAMESPACE/RESOURCE/NAME with the KUBECONFIG credentials.
func newKubeTarget(spec string) (*kubeTarget, error) {
	parts := strings.Split(strings.TrimPrefix(spec, "kubernetes://"), "/")
	if len(parts) != 3 || parts[1] == "" || parts[2] == "" {
		return nil, fmt.Errorf("%q: expected kubernetes://NAMESPACE/RESOURCE/NAME", spec)
	}
	namespace, resource, name := parts[0], parts[1], parts[2]
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
		clientcmd.NewDefaultClientConfigLoadingRules(), &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	if !clientGoDefaults {
		// client-go throttles every client to 5 requests/s (burst 10) unless told otherwise;
		// a lock peer that polls and renews must not be slowed by its own client.
		cfg.QPS, cfg.Burst = 1000, 2000
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	gvr, gr := schema.ParseResourceArg(resource)
	var full schema.GroupVersionResource
	if gvr != nil {
		full, err = mapper.ResourceFor(*gvr)
	}
	if gvr == nil || err != nil {
		full, err = mapper.ResourceFor(gr.WithVersion(""))
	}
	if err != nil {
		return nil, fmt.Errorf("resource %q: %w", resource, err)
	}
	client, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	return &kubeTarget{client: client, gvr: full, name: name, namespace: namespace}, nil
}

func newLocker(spec string) (lockgate.Locker, error) {
	switch {
	case strings.HasPrefix(spec, "file:"):
		return file_locker.NewFileLocker(fileDir(spec))
	case strings.HasPrefix(spec, "http://"), strings.HasPrefix(spec, "https://"):
		return distributed_locker.NewHttpLocker(strings.TrimSuffix(spec, "/")), nil
	case strings.HasPrefix(spec, "kubernetes://"):
		t, err := newKubeTarget(spec)
		if err != nil {
			return nil, fmt.Errorf("locker %w", err)
		}
		return distributed_locker.NewKubernetesLocker(t.client, t.gvr, t.name, t.namespace), nil
	default:
		return nil, fmt.Errorf("unknown locker %q", spec)
	}
}

func fileDir(spec string) string {
	return strings.TrimPrefix(strings.TrimPrefix(spec, "file:"), "//")
}

type lockFlags struct {
	locker     string
	shared     bool
	nonblk     bool
	timeout    float64
	acquirerID string
}

func (f *lockFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.locker, "locker", os.Getenv("LOCKGATE_LOCKER"), "locker URL")
	fs.BoolVar(&f.shared, "s", false, "shared lock")
	fs.BoolVar(&f.nonblk, "n", false, "non-blocking")
	fs.Float64Var(&f.timeout, "w", -1, "timeout in seconds")
	fs.StringVar(&f.acquirerID, "acquirer-id", "",
		"join Go lockgate's FIFO queue of the Kubernetes/HTTP locker under this id (auto: a random id per process; v0.2.0 only)")
	registerClientFlags(fs)
}

// options are the AcquireOptions the flags ask for; a usage error when this peer cannot honour
// them.
func (f *lockFlags) options() lockgate.AcquireOptions {
	opts := lockgate.AcquireOptions{Shared: f.shared, NonBlocking: f.nonblk}
	if f.timeout == 0 {
		opts.NonBlocking = true
	} else if f.timeout > 0 {
		opts.Timeout = time.Duration(f.timeout * float64(time.Second))
	}
	if f.acquirerID != "" {
		if f.acquirerID == "auto" {
			f.acquirerID = randomAcquirerID()
		}
		if err := setAcquirerID(&opts, f.acquirerID); err != nil {
			fail(exitUsage, "%s", err)
		}
	}
	return opts
}

func randomAcquirerID() string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		fail(exitUnavailable, "random acquirer id: %s", err)
	}
	return "go-" + hex.EncodeToString(b)
}

func execCmd(args []string) {
	fs := flag.NewFlagSet("exec", flag.ContinueOnError)
	var f lockFlags
	f.register(fs)
	quiet := fs.Bool("q", false, "do not print while waiting")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	rest := fs.Args()
	if len(rest) >= 2 && rest[1] == "--" {
		rest = append(rest[:1], rest[2:]...)
	}
	if len(rest) < 2 {
		fail(exitUsage, "usage: lockgate-go exec --locker LOCKER [-s] [-n] [-w SECS] [--acquirer-id ID|auto] NAME -- COMMAND [ARGS...]")
	}
	name, command := rest[0], rest[1:]
	opts := f.options()
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}
	if !*quiet {
		opts.OnWaitFunc = func(lockName string, doWait func() error) error {
			fmt.Fprintf(os.Stderr, "lockgate-go: waiting for locked %q\n", lockName)
			return doWait()
		}
	}
	lost := make(chan struct{}, 1)
	opts.OnLostLeaseFunc = func(lockgate.LockHandle) error {
		lost <- struct{}{}
		return nil
	}
	acquired, handle, err := locker.Acquire(name, opts)
	if err != nil {
		if f.timeout > 0 && strings.Contains(err.Error(), "timeout") {
			fail(exitConflict, "timed out waiting for lock %q", name)
		}
		fail(exitUnavailable, "%s", err)
	}
	if !acquired {
		fail(exitConflict, "lock %q is busy", name)
	}

	cmd := exec.Command(command[0], command[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	if err := cmd.Start(); err != nil {
		_ = locker.Release(handle)
		fail(127, "cannot run %q: %s", command[0], err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	code := 0
wait:
	for {
		select {
		case s := <-sigs:
			_ = cmd.Process.Signal(s)
		case <-lost:
			fmt.Fprintf(os.Stderr, "lockgate-go: lost the lease of lock %q\n", name)
			_ = cmd.Process.Signal(syscall.SIGTERM)
		case err := <-done:
			var exitErr *exec.ExitError
			if errors.As(err, &exitErr) {
				if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
					code = 128 + int(ws.Signal())
				} else {
					code = exitErr.ExitCode()
				}
			} else if err != nil {
				code = exitUnavailable
			}
			break wait
		}
	}
	if err := locker.Release(handle); err != nil {
		fail(exitUnavailable, "release: %s", err)
	}
	os.Exit(code)
}

// loopReport is the one JSON line `loop` prints; the Rust worker prints the same shape.
type loopReport struct {
	Impl       string `json:"impl"`
	Version    string `json:"version"`
	Cycles     int    `json:"cycles"`
	Increments int    `json:"increments"`
	Overlaps   int    `json:"overlaps"`
	// What the exclusive holder we overlapped with wrote into the holder file.
	OverlapsWith []string `json:"overlapsWith,omitempty"`
	Errors       []string `json:"errors"`
}

// loopCmd is a worker for mixed-fleet tests: N cycles of acquire, a guarded read-modify-write of
// a counter file (exclusive) or a check that no exclusive holder is inside (shared), release.
// FILE.holder marks an exclusive holder inside its critical section: finding it already there
// is an overlap, i.e. two holders at once.
func loopCmd(args []string) {
	fs := flag.NewFlagSet("loop", flag.ContinueOnError)
	var f lockFlags
	f.register(fs)
	cycles := fs.Int("cycles", 0, "acquire+release cycles")
	counter := fs.String("counter", "", "file holding the integer the exclusive holders increment")
	holdMs := fs.Int("hold-ms", 0, "milliseconds to hold the lock in each cycle")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	if fs.NArg() != 1 || *cycles <= 0 || *counter == "" || f.nonblk {
		fail(exitUsage, "usage: lockgate-go loop --locker LOCKER [-s] [-w SECS] [--acquirer-id ID|auto] --cycles N --counter FILE [--hold-ms MS] NAME")
	}
	name := fs.Arg(0)
	opts := f.options()
	if opts.NonBlocking {
		fail(exitUsage, "loop: -w 0 would not wait; give a positive -w or none")
	}
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}

	var mu sync.Mutex
	report := loopReport{Impl: "go", Version: lockgateVersion(), Cycles: *cycles, Errors: []string{}}
	record := func(format string, args ...interface{}) {
		mu.Lock()
		defer mu.Unlock()
		report.Errors = append(report.Errors, fmt.Sprintf(format, args...))
	}
	opts.OnLostLeaseFunc = func(h lockgate.LockHandle) error {
		record("lost the lease %s of lock %q", h.UUID, h.LockName)
		return nil
	}
	holder := *counter + ".holder"
	hold := time.Duration(*holdMs) * time.Millisecond

	for i := 0; i < *cycles; i++ {
		acquired, handle, err := locker.Acquire(name, opts)
		if err != nil {
			record("cycle %d: acquire: %s", i, err)
			continue
		}
		if !acquired {
			record("cycle %d: acquire: not acquired", i)
			continue
		}
		if f.shared {
			if _, err := os.Lstat(holder); err == nil {
				who, _ := os.ReadFile(holder)
				mu.Lock()
				report.Overlaps++
				report.OverlapsWith = append(report.OverlapsWith, string(who))
				mu.Unlock()
			}
			time.Sleep(hold)
		} else {
			mine := true
			h, err := os.OpenFile(holder, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
			if errors.Is(err, os.ErrExist) {
				who, _ := os.ReadFile(holder)
				mine = false
				mu.Lock()
				report.Overlaps++
				report.OverlapsWith = append(report.OverlapsWith, string(who))
				mu.Unlock()
			} else if err != nil {
				record("cycle %d: create %s: %s", i, holder, err)
				mine = false
			} else {
				// Who holds it, for the report of whoever overlaps.
				_, _ = fmt.Fprintf(h, "go %s pid %d cycle %d", lockgateVersion(), os.Getpid(), i)
				_ = h.Close()
			}
			if n, err := readCounter(*counter); err != nil {
				record("cycle %d: %s", i, err)
			} else {
				time.Sleep(hold)
				if err := writeCounter(*counter, n+1); err != nil {
					record("cycle %d: %s", i, err)
				} else {
					mu.Lock()
					report.Increments++
					mu.Unlock()
				}
			}
			if mine {
				if err := os.Remove(holder); err != nil {
					record("cycle %d: remove %s: %s", i, holder, err)
				}
			}
		}
		if err := locker.Release(handle); err != nil {
			record("cycle %d: release: %s", i, err)
		}
	}

	mu.Lock()
	out, err := json.Marshal(report)
	ok := len(report.Errors) == 0 && report.Overlaps == 0
	mu.Unlock()
	if err != nil {
		fail(exitUnavailable, "report: %s", err)
	}
	fmt.Println(string(out))
	if !ok {
		os.Exit(1)
	}
}

// readCounter reads the decimal integer in path; a missing or empty file counts as 0.
func readCounter(path string) (int64, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read counter: %w", err)
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("counter %s holds %q: %w", path, s, err)
	}
	return n, nil
}

// writeCounter replaces path with n (write a temporary file, rename), so that a reader never
// sees a half-written number even when holders overlap.
func writeCounter(path string, n int64) error {
	tmp := fmt.Sprintf("%s.tmp.%d", path, os.Getpid())
	if err := os.WriteFile(tmp, []byte(strconv.FormatInt(n, 10)+"\n"), 0o644); err != nil {
		return fmt.Errorf("write counter: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write counter: %w", err)
	}
	return nil
}

// gcCmd runs v0.2.0's lock-file GC (file_lock.GCLockFileDir) over a file locker's directory:
// once, or again and again until killed with --loop.
func gcCmd(args []string) {
	fs := flag.NewFlagSet("gc", flag.ContinueOnError)
	locker := fs.String("locker", os.Getenv("LOCKGATE_LOCKER"), "file:DIR")
	minAge := fs.Float64("min-age", -1, "only files not modified for this many seconds are candidates")
	loop := fs.Bool("loop", false, "run again and again until killed")
	interval := fs.Int("interval-ms", 10, "pause between two runs with --loop")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	if !strings.HasPrefix(*locker, "file:") || *minAge < 0 || fs.NArg() != 0 {
		fail(exitUsage, "usage: lockgate-go gc --locker file:DIR --min-age SECS [--loop] [--interval-ms MS]")
	}
	if !hasV02Features {
		fail(exitUsage, "%s", errNeedsV02("gc"))
	}
	dir := filepath.Clean(fileDir(*locker))
	age := time.Duration(*minAge * float64(time.Second))
	if err := gcLockFiles(dir, age); err != nil {
		if !*loop {
			fail(exitUnavailable, "gc: %s", err)
		}
		fmt.Fprintf(os.Stderr, "lockgate-go: gc: %s\n", err)
	}
	for *loop {
		time.Sleep(time.Duration(*interval) * time.Millisecond)
		if err := gcLockFiles(dir, age); err != nil {
			fmt.Fprintf(os.Stderr, "lockgate-go: gc: %s\n", err)
		}
	}
}

func serveCmd(args []string) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	storeSpec := fs.String("store", "memory", "memory, or kubernetes://NAMESPACE/RESOURCE/NAME (annotations of that object, shared by every server using it)")
	registerClientFlags(fs)
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	var handler *distributed_locker.HttpBackendHandler
	switch {
	case *storeSpec == "memory":
		store := optimistic_locking_store.NewInMemoryStore()
		handler = distributed_locker.NewHttpBackendHandler(distributed_locker.NewOptimisticLockingStorageBasedBackend(store))
	case strings.HasPrefix(*storeSpec, "kubernetes://"):
		t, err := newKubeTarget(*storeSpec)
		if err != nil {
			fail(exitUsage, "store %s", err)
		}
		store := optimistic_locking_store.NewKubernetesResourceAnnotationsStore(t.client, t.gvr, t.name, t.namespace)
		handler = distributed_locker.NewHttpBackendHandler(distributed_locker.NewOptimisticLockingStorageBasedBackend(store))
	default:
		fail(exitUsage, "unknown store %q: expected memory or kubernetes://NAMESPACE/RESOURCE/NAME", *storeSpec)
	}
	// Listen first: the printed address is the bound one (the real port for ADDR:0), and a
	// client that read it can connect at once.
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(exitUnavailable, "%s", err)
	}
	fmt.Printf("serving on %s\n", l.Addr())
	if err := http.Serve(l, handler); err != nil {
		fail(exitUnavailable, "%s", err)
	}
}

// monoNs is CLOCK_MONOTONIC in nanoseconds: comparable across the processes of one host.
func monoNs() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// benchCmd times acquire+release cycles of one lock and prints one JSON line. The clock starts
// after the set-up (the client, API discovery); with --ready the process also makes one
// acquire+release of a lock of its own (connections opened), prints "ready", and starts its
// loop when a line arrives on stdin, so that many processes can start together. The JSON has
// the loop's start and end on CLOCK_MONOTONIC.
func benchCmd(args []string) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var f lockFlags
	f.register(fs)
	iterations := fs.Int("iterations", 1000, "acquire+release cycles")
	name := fs.String("name", "bench", "lock name")
	ready := fs.Bool("ready", false, "warm up, print \"ready\", and start on a line from stdin")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	opts := f.options()
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}
	if *ready {
		warm := fmt.Sprintf("%s/warm-up-%d", *name, os.Getpid())
		acquired, handle, err := locker.Acquire(warm, opts)
		if err != nil || !acquired {
			fail(exitUnavailable, "warm-up acquire: acquired=%v err=%v", acquired, err)
		}
		if err := locker.Release(handle); err != nil {
			fail(exitUnavailable, "warm-up release: %s", err)
		}
		fmt.Println("ready")
		if !bufio.NewScanner(os.Stdin).Scan() {
			fail(exitUsage, "bench --ready: stdin closed before the start line")
		}
	}
	samples := make([]time.Duration, 0, *iterations)
	startMono := monoNs()
	start := time.Now()
	for i := 0; i < *iterations; i++ {
		t := time.Now()
		acquired, handle, err := locker.Acquire(*name, opts)
		if err != nil || !acquired {
			fail(exitUnavailable, "acquire: acquired=%v err=%v", acquired, err)
		}
		if err := locker.Release(handle); err != nil {
			fail(exitUnavailable, "release: %s", err)
		}
		samples = append(samples, time.Since(t))
	}
	total := time.Since(start)
	endMono := monoNs()
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	pct := func(p float64) int64 { return samples[int(p*float64(len(samples)-1))].Nanoseconds() }
	out, _ := json.Marshal(map[string]interface{}{
		"impl":          "go",
		"version":       lockgateVersion(),
		"op":            "acquire_release",
		"iterations":    *iterations,
		"ns_per_op":     total.Nanoseconds() / int64(*iterations),
		"p50_ns":        pct(0.50),
		"p99_ns":        pct(0.99),
		"start_mono_ns": startMono,
		"end_mono_ns":   endMono,
	})
	fmt.Println(string(out))
}

// benchWaitCmd serves a handoff benchmark: for each line on stdin it acquires the lock
// (blocking), prints "waiting" once it finds the lock busy (OnWaitFunc), then
// "granted <CLOCK_MONOTONIC ns>" at the moment it got it, and releases.
func benchWaitCmd(args []string) {
	fs := flag.NewFlagSet("bench-wait", flag.ContinueOnError)
	var f lockFlags
	f.register(fs)
	name := fs.String("name", "bench", "lock name")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	opts := f.options()
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}
	opts.OnWaitFunc = func(lockName string, doWait func() error) error {
		fmt.Println("waiting")
		return doWait()
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		acquired, handle, err := locker.Acquire(*name, opts)
		granted := monoNs()
		if err != nil || !acquired {
			fail(exitUnavailable, "acquire: acquired=%v err=%v", acquired, err)
		}
		fmt.Printf("granted %d\n", granted)
		if err := locker.Release(handle); err != nil {
			fail(exitUnavailable, "release: %s", err)
		}
	}
}

// benchHoldCmd is the holder of a handoff benchmark: on a line on stdin it acquires the lock
// (blocking) and prints "held"; on the next line it prints "releasing <CLOCK_MONOTONIC ns>",
// releases, and prints "released".
func benchHoldCmd(args []string) {
	fs := flag.NewFlagSet("bench-hold", flag.ContinueOnError)
	var f lockFlags
	f.register(fs)
	name := fs.String("name", "bench", "lock name")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	opts := f.options()
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		acquired, handle, err := locker.Acquire(*name, opts)
		if err != nil || !acquired {
			fail(exitUnavailable, "acquire: acquired=%v err=%v", acquired, err)
		}
		fmt.Println("held")
		if !in.Scan() {
			return
		}
		fmt.Printf("releasing %d\n", monoNs())
		if err := locker.Release(handle); err != nil {
			fail(exitUnavailable, "release: %s", err)
		}
		fmt.Println("released")
	}
}
