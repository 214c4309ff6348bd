// Package csihostpath is the tests' single-node CSI driver (tests/cluster/test_csi.py), run as
// `csi-hostpath` of the multi-call binary in tools/controlplane (built by scripts/build-cluster): volumes and snapshots are directories under --data, a snapshot a copy of its
// volume (cp -a: owners and modes kept, so a restored mail store belongs to the node's user), a volume
// made from a snapshot a copy of it, a published volume a bind mount into kubelet's pod directory. It
// also answers kubelet's plugin registration on --registry, which node-driver-registrar does for a
// driver in a pod. The kubernetes-csi hostpath driver would do, but the Go module proxy does not serve
// it (nor node-driver-registrar), so this is the least that csi-provisioner, csi-snapshotter and
// kubelet need: one node, no attach, no staging, no topology, no capacity accounting.
package csihostpath

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	reg "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

const name = "hostpath.csi.mailfleet.io"

var data, nodeID, endpoint string

type server struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
}

func (server) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: name, VendorVersion: "0.1"}, nil
}
func (server) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}}}}, nil
}
func (server) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{}, nil
}
func ccap(t csi.ControllerServiceCapability_RPC_Type) *csi.ControllerServiceCapability {
	return &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}}
}
func (server) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{
		ccap(csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME), ccap(csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT)}}, nil
}
func copyTree(from, to string) error {
	if err := os.MkdirAll(to, 0o777); err != nil {
		return err
	}
	out, err := exec.Command("cp", "-a", from+"/.", to).CombinedOutput()
	if err != nil {
		return status.Errorf(codes.Internal, "cp: %v: %s", err, out)
	}
	return nil
}

// CreateVolume and CreateSnapshot are idempotent by name (the sidecars retry): a finished directory is
// the answer; one is made under a temporary name and renamed when complete.
func (server) CreateVolume(_ context.Context, r *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	dir := filepath.Join(data, "volumes", r.Name)
	if _, err := os.Stat(dir); err != nil {
		tmp := dir + ".tmp"
		os.RemoveAll(tmp)
		if err := os.MkdirAll(tmp, 0o777); err != nil {
			return nil, err
		}
		os.Chmod(tmp, 0o777)
		if s := r.GetVolumeContentSource().GetSnapshot(); s != nil {
			if err := copyTree(filepath.Join(data, "snapshots", s.SnapshotId), tmp); err != nil {
				return nil, err
			}
		}
		if err := os.Rename(tmp, dir); err != nil {
			return nil, err
		}
	}
	log.Printf("CreateVolume %s (source %v)", r.Name, r.GetVolumeContentSource())
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: r.Name, CapacityBytes: r.GetCapacityRange().GetRequiredBytes(), ContentSource: r.GetVolumeContentSource()}}, nil
}
func (server) DeleteVolume(_ context.Context, r *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	log.Printf("DeleteVolume %s", r.VolumeId)
	return &csi.DeleteVolumeResponse{}, os.RemoveAll(filepath.Join(data, "volumes", r.VolumeId))
}
func (server) ValidateVolumeCapabilities(_ context.Context, r *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{VolumeCapabilities: r.VolumeCapabilities}}, nil
}
func (server) CreateSnapshot(_ context.Context, r *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	dir := filepath.Join(data, "snapshots", r.Name)
	if _, err := os.Stat(dir); err != nil {
		tmp := dir + ".tmp"
		os.RemoveAll(tmp)
		if err := copyTree(filepath.Join(data, "volumes", r.SourceVolumeId), tmp); err != nil {
			return nil, err
		}
		if err := os.Rename(tmp, dir); err != nil {
			return nil, err
		}
	}
	info, _ := os.Stat(dir)
	log.Printf("CreateSnapshot %s of %s", r.Name, r.SourceVolumeId)
	return &csi.CreateSnapshotResponse{Snapshot: &csi.Snapshot{SnapshotId: r.Name, SourceVolumeId: r.SourceVolumeId, CreationTime: timestamppb.New(info.ModTime()), ReadyToUse: true, SizeBytes: 0}}, nil
}
func (server) DeleteSnapshot(_ context.Context, r *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	log.Printf("DeleteSnapshot %s", r.SnapshotId)
	return &csi.DeleteSnapshotResponse{}, os.RemoveAll(filepath.Join(data, "snapshots", r.SnapshotId))
}
func (server) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: nodeID}, nil
}
func (server) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}
func (server) NodePublishVolume(_ context.Context, r *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	if err := os.MkdirAll(r.TargetPath, 0o750); err != nil {
		return nil, err
	}
	if err := syscall.Mount(filepath.Join(data, "volumes", r.VolumeId), r.TargetPath, "", syscall.MS_BIND, ""); err != nil {
		return nil, status.Errorf(codes.Internal, "bind mount: %v", err)
	}
	log.Printf("NodePublishVolume %s at %s", r.VolumeId, r.TargetPath)
	return &csi.NodePublishVolumeResponse{}, nil
}
func (server) NodeUnpublishVolume(_ context.Context, r *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	syscall.Unmount(r.TargetPath, 0)
	os.Remove(r.TargetPath)
	log.Printf("NodeUnpublishVolume %s at %s", r.VolumeId, r.TargetPath)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

type registration struct {
	reg.UnimplementedRegistrationServer
}

func (registration) GetInfo(context.Context, *reg.InfoRequest) (*reg.PluginInfo, error) {
	return &reg.PluginInfo{Type: reg.CSIPlugin, Name: name, Endpoint: endpoint, SupportedVersions: []string{"1.0.0"}}, nil
}
func (registration) NotifyRegistrationStatus(_ context.Context, s *reg.RegistrationStatus) (*reg.RegistrationStatusResponse, error) {
	log.Printf("registration: %v %s", s.PluginRegistered, s.Error)
	return &reg.RegistrationStatusResponse{}, nil
}

func serve(path string, register func(*grpc.Server)) {
	os.Remove(path)
	os.MkdirAll(filepath.Dir(path), 0o750)
	l, err := net.Listen("unix", path)
	if err != nil {
		log.Fatal(err)
	}
	s := grpc.NewServer()
	register(s)
	go func() { log.Fatal(s.Serve(l)) }()
}

// Main runs the driver with its command-line arguments (without the program name) until it is killed.
// A flag set of its own: the multi-call binary's other commands own the global one.
func Main(args []string) int {
	flags := flag.NewFlagSet("csi-hostpath", flag.ExitOnError)
	registry := flags.String("registry", "", "kubelet's plugins_registry directory")
	flags.StringVar(&endpoint, "endpoint", "", "the CSI socket")
	flags.StringVar(&data, "data", "", "where volumes and snapshots live")
	flags.StringVar(&nodeID, "node", "", "node id")
	_ = flags.Parse(args) // ExitOnError: it exits on a bad flag
	serve(endpoint, func(s *grpc.Server) {
		var srv server
		csi.RegisterIdentityServer(s, srv)
		csi.RegisterControllerServer(s, srv)
		csi.RegisterNodeServer(s, srv)
	})
	serve(filepath.Join(*registry, name+"-reg.sock"), func(s *grpc.Server) { reg.RegisterRegistrationServer(s, registration{}) })
	log.Printf("serving %s", endpoint)
	select {}
}
