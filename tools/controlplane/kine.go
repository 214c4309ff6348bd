// kine: the etcd that tests/cluster's kube-apiserver talks to, kine's in-memory backend behind kine's
// etcd gRPC server (github.com/k3s-io/kine/pkg/server), which is all the tests use (`--endpoint
// memory://`, conftest.py). It replaces kine's own main (pkg/app), whose pkg/endpoint links every
// backend kine has (NATS with an embedded nats-server, pebble, PostgreSQL, MySQL, S3, t4, and modernc's
// pure-Go SQLite when CGO_ENABLED=0): 352 packages, 35 MB of Go source, a fifth of what the cold build
// compiled, that nothing here runs. The wiring below is pkg/endpoint's Listen for one backend, with the
// same gRPC limits and the same defaults as kine's flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/k3s-io/kine/pkg/drivers"
	"github.com/k3s-io/kine/pkg/drivers/memory"
	"github.com/k3s-io/kine/pkg/server"
	"github.com/k3s-io/kine/pkg/version"
	"github.com/sirupsen/logrus"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

func runKine() int {
	flags := flag.NewFlagSet("kine", flag.ContinueOnError)
	listen := flags.String("listen-address", "0.0.0.0:2379", "address of the etcd API (host:port)")
	endpoint := flags.String("endpoint", "memory://", "storage backend: only kine's in-memory one is built in")
	metricsAddress := flags.String("metrics-bind-address", "0", "only \"0\" (off): this kine serves no metrics")
	notify := flags.Duration("watch-progress-notify-interval", 5*time.Second, "interval of watch progress notifications")
	etcdVersion := flags.String("emulated-etcd-version", "3.6.11", "the etcd version reported to clients")
	showVersion := flags.Bool("version", false, "print the version and exit")
	if err := flags.Parse(os.Args[1:]); err != nil {
		return 2
	}
	if *showVersion {
		fmt.Printf("kine version %s (memory backend only)\n", version.Version)
		return 0
	}
	if flags.NArg() != 0 || (*endpoint != "memory://" && *endpoint != "") || (*metricsAddress != "0" && *metricsAddress != "") {
		fmt.Fprintln(os.Stderr, "kine: this build has only --endpoint memory:// and no metrics (--metrics-bind-address 0)")
		return 2
	}
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano})
	logrus.SetOutput(os.Stderr)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	_, backend, err := memory.New(ctx, &sync.WaitGroup{}, &drivers.Config{})
	if err == nil {
		err = backend.Start(ctx)
	}
	if err != nil {
		logrus.Errorf("starting kine's memory backend: %v", err)
		return 1
	}
	// pkg/endpoint's options: etcd's own keepalive and request-size limits.
	grpcServer := grpc.NewServer(
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: embed.DefaultGRPCKeepAliveMinTime}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time: embed.DefaultGRPCKeepAliveInterval, Timeout: embed.DefaultGRPCKeepAliveTimeout,
		}),
		grpc.MaxConcurrentStreams(embed.DefaultMaxConcurrentStreams),
		grpc.MaxRecvMsgSize(int(embed.DefaultMaxRequestBytes)+512*1024),
		grpc.MaxSendMsgSize(math.MaxInt32),
	)
	server.New(backend, "http", *notify, *etcdVersion).Register(grpcServer)
	listener, err := (&net.ListenConfig{}).Listen(ctx, "tcp", *listen)
	if err != nil {
		logrus.Errorf("listening on %s: %v", *listen, err)
		return 1
	}
	go func() {
		<-ctx.Done()
		timer := time.AfterFunc(2*time.Second, grpcServer.Stop) // as kine: 2 s to finish, then cut
		defer timer.Stop()
		grpcServer.GracefulStop()
	}()
	logrus.Infof("Kine available at http://%s (memory backend)", listener.Addr())
	if err := grpcServer.Serve(listener); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		logrus.Errorf("kine's gRPC server: %v", err)
		return 1
	}
	return 0
}
