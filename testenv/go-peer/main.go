// Command lockgate-go drives the real Go lockgate (github.com/werf/lockgate, the version werf
// pins) with the same command-line shape as the Rust lockgate, so that one test can run either
// implementation against the other. It is a test peer, not part of the product.
//
//	lockgate-go exec --locker LOCKER [-s] [-n] [-w SECS] NAME -- COMMAND [ARGS...]
//	lockgate-go serve --listen ADDR
//	lockgate-go bench --locker LOCKER [-s] [--iterations N] [--name NAME]
//
// LOCKER is file:DIR, kubernetes://NAMESPACE/RESOURCE/NAME (with KUBECONFIG; an empty
// NAMESPACE means cluster-scoped) or http://HOST:PORT. Exit codes follow flock(1): the
// command's status, 1 when the lock is busy or the timeout passed, 64 for usage errors,
// 69 for other lock errors.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"bufio"

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

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "lockgate-go: "+format+"\n", args...)
	os.Exit(code)
}

func main() {
	if len(os.Args) < 2 {
		fail(exitUsage, "usage: lockgate-go exec|serve|bench ...")
	}
	switch os.Args[1] {
	case "exec":
		execCmd(os.Args[2:])
	case "serve":
		serveCmd(os.Args[2:])
	case "bench":
		benchCmd(os.Args[2:])
	case "bench-wait":
		benchWaitCmd(os.Args[2:])
	default:
		fail(exitUsage, "unknown command %q", os.Args[1])
	}
}

func newLocker(spec string) (lockgate.Locker, error) {
	switch {
	case strings.HasPrefix(spec, "file:"):
		return file_locker.NewFileLocker(strings.TrimPrefix(strings.TrimPrefix(spec, "file:"), "//"))
	case strings.HasPrefix(spec, "http://"), strings.HasPrefix(spec, "https://"):
		return distributed_locker.NewHttpLocker(strings.TrimSuffix(spec, "/")), nil
	case strings.HasPrefix(spec, "kubernetes://"):
		parts := strings.Split(strings.TrimPrefix(spec, "kubernetes://"), "/")
		if len(parts) != 3 || parts[1] == "" || parts[2] == "" {
			return nil, fmt.Errorf("locker %q: expected kubernetes://NAMESPACE/RESOURCE/NAME", spec)
		}
		namespace, resource, name := parts[0], parts[1], parts[2]
		cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(
			clientcmd.NewDefaultClientConfigLoadingRules(), &clientcmd.ConfigOverrides{}).ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("kubeconfig: %w", err)
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
		return distributed_locker.NewKubernetesLocker(client, full, name, namespace), nil
	default:
		return nil, fmt.Errorf("unknown locker %q", spec)
	}
}

type lockFlags struct {
	locker  string
	shared  bool
	nonblk  bool
	timeout float64
}

func (f *lockFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.locker, "locker", os.Getenv("LOCKGATE_LOCKER"), "locker URL")
	fs.BoolVar(&f.shared, "s", false, "shared lock")
	fs.BoolVar(&f.nonblk, "n", false, "non-blocking")
	fs.Float64Var(&f.timeout, "w", -1, "timeout in seconds")
}

func (f *lockFlags) options() lockgate.AcquireOptions {
	opts := lockgate.AcquireOptions{Shared: f.shared, NonBlocking: f.nonblk}
	if f.timeout == 0 {
		opts.NonBlocking = true
	} else if f.timeout > 0 {
		opts.Timeout = time.Duration(f.timeout * float64(time.Second))
	}
	return opts
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
		fail(exitUsage, "usage: lockgate-go exec --locker LOCKER [-s] [-n] [-w SECS] NAME -- COMMAND [ARGS...]")
	}
	name, command := rest[0], rest[1:]
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}
	opts := f.options()
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

func serveCmd(args []string) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	store := optimistic_locking_store.NewInMemoryStore()
	backend := distributed_locker.NewOptimisticLockingStorageBasedBackend(store)
	handler := distributed_locker.NewHttpBackendHandler(backend)
	fmt.Printf("serving on %s\n", *listen)
	if err := http.ListenAndServe(*listen, handler); err != nil {
		fail(exitUnavailable, "%s", err)
	}
}

// benchCmd times acquire+release cycles of one lock and prints one JSON line.
func benchCmd(args []string) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var f lockFlags
	f.register(fs)
	iterations := fs.Int("iterations", 1000, "acquire+release cycles")
	name := fs.String("name", "bench", "lock name")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}
	opts := f.options()
	samples := make([]time.Duration, 0, *iterations)
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
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	pct := func(p float64) int64 { return samples[int(p*float64(len(samples)-1))].Nanoseconds() }
	out, _ := json.Marshal(map[string]interface{}{
		"impl":       "go",
		"op":         "acquire_release",
		"iterations": *iterations,
		"ns_per_op":  total.Nanoseconds() / int64(*iterations),
		"p50_ns":     pct(0.50),
		"p99_ns":     pct(0.99),
	})
	fmt.Println(string(out))
}

// benchWaitCmd serves a handoff benchmark: for each line on stdin it acquires the lock
// (blocking), prints CLOCK_MONOTONIC in nanoseconds at the moment it got it, and releases.
func benchWaitCmd(args []string) {
	fs := flag.NewFlagSet("bench-wait", flag.ContinueOnError)
	var f lockFlags
	f.register(fs)
	name := fs.String("name", "bench", "lock name")
	if err := fs.Parse(args); err != nil {
		os.Exit(exitUsage)
	}
	locker, err := newLocker(f.locker)
	if err != nil {
		fail(exitUsage, "%s", err)
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		acquired, handle, err := locker.Acquire(*name, f.options())
		var ts unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		if err != nil || !acquired {
			fail(exitUnavailable, "acquire: acquired=%v err=%v", acquired, err)
		}
		fmt.Printf("granted %d\n", ts.Nano())
		if err := locker.Release(handle); err != nil {
			fail(exitUnavailable, "release: %s", err)
		}
	}
}
