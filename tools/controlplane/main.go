// Command mailfleet-k8s is every Go program of the tests' cluster tier (tests/cluster) in one
// binary, like the old hyperkube: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet
// and kube-proxy from k8s.io/kubernetes, kine (kine.go), and the project's CSI driver (tools/csi-hostpath).
// One binary is one link instead of seven, and each of those links is tens of seconds and a few GiB of
// memory on a cold machine. scripts/build-cluster builds it and names it by each command (hard links),
// so the tests run `kube-apiserver ...` as before.
//
// The command is the program's name (argv[0]); failing that, the first argument
// (`mailfleet-k8s kubelet --version`).
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	_ "time/tzdata" // kube-apiserver and kube-controller-manager: CronJob time zones

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // the JSON log format, as each command's main has
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go's metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // the version metric
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
	csihostpath "mailfleet.io/tools/csi-hostpath"
)

// The same calls as each upstream command's main.
var commands = map[string]func() int{
	"kube-apiserver":          func() int { return cli.Run(apiserver.NewAPIServerCommand()) },
	"kube-controller-manager": func() int { return cli.Run(controllermanager.NewControllerManagerCommand()) },
	"kube-scheduler":          func() int { return cli.Run(scheduler.NewSchedulerCommand()) },
	"kubelet":                 func() int { return cli.Run(kubelet.NewKubeletCommand(context.Background())) },
	"kube-proxy":              func() int { return cli.Run(proxy.NewProxyCommand()) },
	"kine":                    runKine,
	"csi-hostpath":            func() int { return csihostpath.Main(os.Args[1:]) },
}

func main() {
	run, ok := commands[filepath.Base(os.Args[0])]
	if !ok && len(os.Args) > 1 {
		if run, ok = commands[os.Args[1]]; ok {
			os.Args = os.Args[1:] // cobra and kine read os.Args
		}
	}
	if !ok {
		names := make([]string, 0, len(commands))
		for name := range commands {
			names = append(names, name)
		}
		sort.Strings(names)
		fmt.Fprintf(os.Stderr, "usage: %s COMMAND [ARGS...], or run it as COMMAND; commands: %v\n", filepath.Base(os.Args[0]), names)
		os.Exit(2)
	}
	os.Exit(run())
}
