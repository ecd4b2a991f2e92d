"""A stand-in for the kubelet, for the tests only: runs one pod of a Deployment read back
from the real kube-apiserver as podman containers, the way a kubelet would run it.

Why: the chart's operator Deployment and the gateway Deployment the operator renders are
what a user's ``helm install`` meets first; checking them as text proves nothing about the
image, the user it runs as, its read-only root, its mounts or its probes. No kubelet, CNI
or container registry can run on the test machines, but podman can.

What is real: the image (hack/image.sh), the Deployment and its ReplicaSet's Pod objects
(the controller manager creates them; we bind one to a node and report its status like a
kubelet), the ServiceAccount token (TokenRequest API, bound to the Pod) and the cluster CA
at /var/run/secrets/kubernetes.io/serviceaccount, ConfigMap/Secret volumes in the
kubelet's ``..data`` symlink layout, updated from the API by the same atomic swap, env
(values, fieldRef, configMapKeyRef/secretKeyRef, envFrom, ``$(VAR)`` expansion), command
and args, the security context (user and groups, fsGroup, read-only root, dropped
capabilities, no-new-privileges, runAsNonRoot refused for root), and readiness, liveness
and startup probes polled from the node side as the kubelet does, a liveness failure
restarting the container.

``podman kube play`` does the container part (image, command/args, env, user/groups,
read-only root, capabilities, volumes as host paths, host network): we hand it a Pod
manifest in which everything it lacks is already resolved. We write only what it lacks:
picking and reporting the Pod object, the token projection, live ConfigMap swaps, env
sources from the API, and the probes (kube play would turn an httpGet probe into a curl
run inside the image, which has no curl).

What it leaves untested (named so no one mistakes it for a kubelet):
  * pod networking: host network on loopback. The pod IP is 127.0.0.1, every container
    port is a host port (so one replica per Deployment at a time), and
    KUBERNETES_SERVICE_HOST/PORT point at the API server's loopback address;
  * scheduling, resource requests/limits (no cgroup limits), eviction, image pulls (a
    missing image is ErrImageNeverPull), service links, cluster DNS (the host's resolver),
    seccomp profiles other than podman's default, lifecycle hooks, init containers;
  * restart back-off is short (a few seconds), not the kubelet's five minutes.
The sandbox cannot raise rlimits, so containers get nofile/nproc 4096 (podman's default
would try to raise them), and podman uses runc (crun fails on this machine's cgroups).
"""

from .pod import RunningPod
from .podman import SKIP_IMAGE_ENV, Podman, built_image
from .runner import PodRunner
from .spec import NODE_NAME, POD_IP, AtomicDir, PodStartError, expand, field_value, project_keys

__all__ = [
    "NODE_NAME",
    "POD_IP",
    "SKIP_IMAGE_ENV",
    "AtomicDir",
    "PodRunner",
    "PodStartError",
    "Podman",
    "RunningPod",
    "built_image",
    "expand",
    "field_value",
    "project_keys",
]
