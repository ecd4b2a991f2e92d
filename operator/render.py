"""Pure renderers: an EgressGateway in, the Kubernetes objects that run it out.

Nothing here talks to the API server. Every function returns plain dicts in the shape the
API expects, complete enough to be server-side applied as-is: re-applying them puts any
hand edit of a field the operator owns back to what the gateway's spec says.

The Deployment's pod template depends only on the gateway's spec and the operator's
settings, never on the bundle: a policy change rewrites the bundle ConfigMap, which the
pods hot-reload, and never rolls the Deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tidegate.gateway.model import Gateway

from .exposure import (
    ANN_PROXY_PROTOCOL,
    ANN_TG_ATTRIBUTES,
    PRESERVE_CLIENT_IP,
    parse_attributes,
    service_spec_extras,
)
from .exposure import service_annotations as _service_annotations
from .proxyenv import ClusterNetwork, render_proxy_env

DEFAULT_IMAGE = "tidegate:0.1.0"
MANAGER = "tidegate-operator"
PROXY_PORT = 3128
METRICS_PORT = 9090
BUNDLE_DIR = "/etc/tidegate/bundle"
IDENTITIES_DIR = "/etc/tidegate/identities"
IDENTITIES_KEY = "identities.json"
BUNDLE_KEY = "bundle.json"
BUNDLE_GZ_KEY = "bundle.json.gz"
RUN_AS = 65532

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_GATEWAY = "tidegate.io/gateway"

ANN_BUNDLE_SHA = "tidegate.io/bundle-sha256"
ANN_BUNDLE_GENERATION = "tidegate.io/bundle-generation"
ANN_IDENTITIES_SHA = "tidegate.io/identities-sha256"
ANN_IDENTITIES_GENERATION = "tidegate.io/identities-generation"
COMPONENT_IDENTITIES = "identities"
# Identity shards per gateway at most (see identities.py); the gateway's Role names them all.
MAX_IDENTITY_SHARDS = 32

# Static, so they never roll the Deployment; the metrics port is never on the Service.
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(METRICS_PORT),
    "prometheus.io/path": "/metrics",
}

DEFAULT_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}
TOPOLOGY_KEYS = {"zone": "topology.kubernetes.io/zone", "hostname": "kubernetes.io/hostname"}


@dataclass(frozen=True, slots=True)
class Names:
    """Names of everything one gateway owns, all in the gateway's namespace."""

    gateway: str
    namespace: str

    @property
    def workload(self) -> str:
        """Deployment, Service, PDB, HPA, ServiceAccount, Role and RoleBinding."""
        return f"{self.gateway}-gateway"

    @property
    def bundle(self) -> str:
        return f"{self.gateway}-bundle"

    @property
    def proxy_service(self) -> str:
        """The in-cluster ClusterIP Service, whatever spec.service says."""
        return f"{self.gateway}-proxy"

    @property
    def proxy_env(self) -> str:
        """The ConfigMap of proxy variables for workloads' envFrom."""
        return f"{self.gateway}-proxy-env"

    def proxy_host(self, cluster_domain: str) -> str:
        return f"{self.proxy_service}.{self.namespace}.svc.{cluster_domain}"

    @property
    def identities(self) -> str:
        """The identities index ConfigMap; its shards are ``<identities>-<i>``."""
        return f"{self.gateway}-identities"

    def identity_shard(self, shard: int) -> str:
        return f"{self.identities}-{shard}"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.gateway}"

    def selector(self) -> dict[str, str]:
        return {LABEL_NAME: "tidegate-gateway", LABEL_INSTANCE: self.gateway}

    def labels(self) -> dict[str, str]:
        return {
            **self.selector(),
            LABEL_COMPONENT: "gateway",
            LABEL_MANAGED_BY: MANAGER,
            LABEL_GATEWAY: self.gateway,
        }


@dataclass(frozen=True, slots=True)
class Owner:
    """What an ownerReference needs to know about the EgressGateway object."""

    name: str
    uid: str
    api_version: str = "tidegate.io/v1alpha1"
    kind: str = "EgressGateway"

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def object_meta(names: Names, owner: Owner | None, name: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name or names.workload,
        "namespace": names.namespace,
        "labels": names.labels(),
    }
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def _workload(gateway: Gateway) -> Mapping[str, Any]:
    return gateway.workload


def _mapping(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _proxy_env_extras(gateway: Gateway) -> list[str]:
    extra = _mapping(_workload(gateway).get("proxyEnv")).get("noProxy") or []
    return [str(e) for e in extra] if isinstance(extra, list) else []


# --- identity and RBAC --------------------------------------------------------------------


def render_service_account(names: Names, owner: Owner | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": object_meta(names, owner)}


def render_role(names: Names, owner: Owner | None = None) -> dict[str, Any]:
    """Read access to the gateway's own ConfigMaps (bundle, identities), nothing else."""
    shards = [names.identity_shard(i) for i in range(MAX_IDENTITY_SHARDS)]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(names, owner),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [names.bundle, names.identities, *shards],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }


def render_role_binding(names: Names, owner: Owner | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(names, owner),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": names.workload,
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": names.workload, "namespace": names.namespace}
        ],
    }


# --- workload -----------------------------------------------------------------------------


def desired_replicas(gateway: Gateway, current: int | None = None) -> int | None:
    """Replicas to put in the Deployment: the spec's, or under autoscaling the live count.

    With an HPA the Deployment's replica count belongs to the HPA. Dropping the field
    from an apply would reset it to 1 for a moment (the field's default), so the operator
    carries the live value over instead; on first creation it starts at minReplicas.
    """
    workload = _workload(gateway)
    autoscaling = _mapping(workload.get("autoscaling"))
    if autoscaling:
        if current is not None:
            return current
        return int(autoscaling.get("minReplicas", 2))
    replicas = workload.get("replicas", 2)
    return int(replicas) if isinstance(replicas, int) else 2


def min_available_replicas(gateway: Gateway) -> int:
    """The smallest replica count the spec allows (for the PDB decision)."""
    autoscaling = _mapping(_workload(gateway).get("autoscaling"))
    if autoscaling:
        return int(autoscaling.get("minReplicas", 2))
    replicas = _workload(gateway).get("replicas", 2)
    return int(replicas) if isinstance(replicas, int) else 2


def gateway_command(names: Names) -> list[str]:
    return [
        "tidegate",
        "gateway",
        "--bundle",
        f"{BUNDLE_DIR}/{BUNDLE_KEY}",
        "--configmap",
        f"{names.namespace}/{names.bundle}",
        "--identities",
        IDENTITIES_DIR,
        "--identities-configmap",
        f"{names.namespace}/{names.identities}",
        "--listen",
        f"0.0.0.0:{PROXY_PORT}",
        "--metrics-listen",
        f"0.0.0.0:{METRICS_PORT}",
    ]


def proxy_protocol_args(gateway: Gateway) -> list[str]:
    """Gateway flags for spec.service.proxyProtocol: require the header from these peers."""
    if gateway.proxy_protocol_from is None:
        return []
    return ["--proxy-protocol", "--proxy-protocol-from", *map(str, gateway.proxy_protocol_from)]


def _topology_spread(gateway: Gateway, names: Names) -> list[dict[str, Any]]:
    mode = _workload(gateway).get("topologySpread", "zone")
    key = TOPOLOGY_KEYS.get(str(mode))
    if key is None:
        return []
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": names.selector()},
        }
    ]


def identities_volume(names: Names) -> dict[str, Any]:
    """The identities index and every possible shard, as files (all optional: only those
    that exist appear). The API watch is the fast path; these let a pod start, and keep
    serving, when it cannot reach the API."""
    sources = [
        {
            "configMap": {
                "name": name,
                "optional": True,
                "items": [{"key": IDENTITIES_KEY, "path": f"{name}.json"}],
            }
        }
        for name in [names.identities]
        + [names.identity_shard(i) for i in range(MAX_IDENTITY_SHARDS)]
    ]
    return {"name": "identities", "projected": {"sources": sources}}


def render_deployment(
    gateway: Gateway,
    names: Names,
    *,
    image: str = DEFAULT_IMAGE,
    owner: Owner | None = None,
    current_replicas: int | None = None,
) -> dict[str, Any]:
    workload = _workload(gateway)
    spec_image = workload.get("image")
    container: dict[str, Any] = {
        "name": "gateway",
        "image": spec_image if isinstance(spec_image, str) and spec_image else image,
        "imagePullPolicy": "IfNotPresent",
        "command": gateway_command(names) + proxy_protocol_args(gateway),
        "ports": [
            {"name": "proxy", "containerPort": PROXY_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": _mapping(workload.get("resources")) or DEFAULT_RESOURCES,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "bundle", "mountPath": BUNDLE_DIR, "readOnly": True},
            {"name": "identities", "mountPath": IDENTITIES_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.workload,
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {
                "name": "bundle",
                "configMap": {
                    "name": names.bundle,
                    # Only one of the two keys exists at a time; optional skips the other.
                    "optional": True,
                    "items": [
                        {"key": BUNDLE_KEY, "path": BUNDLE_KEY},
                        {"key": BUNDLE_GZ_KEY, "path": BUNDLE_GZ_KEY},
                    ],
                },
            },
            identities_volume(names),
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    }
    spread = _topology_spread(gateway, names)
    if spread:
        pod_spec["topologySpreadConstraints"] = spread
    for field in ("nodeSelector", "affinity"):
        value = _mapping(workload.get(field))
        if value:
            pod_spec[field] = value
    tolerations = workload.get("tolerations")
    if isinstance(tolerations, list) and tolerations:
        pod_spec["tolerations"] = list(tolerations)

    spec: dict[str, Any] = {
        "selector": {"matchLabels": names.selector()},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        },
        "template": {
            "metadata": {"labels": names.labels(), "annotations": dict(SCRAPE_ANNOTATIONS)},
            "spec": pod_spec,
        },
    }
    replicas = desired_replicas(gateway, current_replicas)
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(names, owner),
        "spec": spec,
    }


def service_annotations(gateway: Gateway) -> dict[str, str]:
    """AWS Load Balancer Controller annotations derived from spec.service, plus extras."""
    return _service_annotations(_mapping(_workload(gateway).get("service")))


def _proxy_ports() -> list[dict[str, Any]]:
    return [{"name": "proxy", "port": PROXY_PORT, "targetPort": "proxy", "protocol": "TCP"}]


def proxy_protocol_annotations(gateway: Gateway, annotations: Mapping[str, str]) -> dict[str, str]:
    """With PROXY protocol on a LoadBalancer: the controller sends the v2 header on every
    target group (``"*"``), and client-IP preservation is turned off so the connection's peer
    is always the load balancer (a preserved client address is not in the trusted ranges, so
    its header would be refused as unexpected). Other target-group attributes are kept."""
    service = _mapping(_workload(gateway).get("service"))
    if gateway.proxy_protocol_from is None or service.get("type", "LoadBalancer") != "LoadBalancer":
        return {}
    attributes = parse_attributes(annotations.get(ANN_TG_ATTRIBUTES, ""))
    attributes[PRESERVE_CLIENT_IP] = "false"
    return {
        ANN_PROXY_PROTOCOL: "*",
        ANN_TG_ATTRIBUTES: ",".join(f"{k}={v}" for k, v in attributes.items()),
    }


def render_service(gateway: Gateway, names: Names, owner: Owner | None = None) -> dict[str, Any]:
    """The Service clients outside the cluster use (spec.service; usually a LoadBalancer)."""
    service = _mapping(_workload(gateway).get("service"))
    kind = str(service.get("type", "LoadBalancer"))
    meta = object_meta(names, owner)
    annotations = service_annotations(gateway)
    annotations.update(proxy_protocol_annotations(gateway, annotations))
    if annotations:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {
        "type": kind,
        "selector": names.selector(),
        "ports": _proxy_ports(),
        **service_spec_extras(service),
    }
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def render_cluster_service(names: Names, owner: Owner | None = None) -> dict[str, Any]:
    """The in-cluster ClusterIP Service: kube-proxy only DNATs, so pod addresses arrive."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(names, owner, names.proxy_service),
        "spec": {"type": "ClusterIP", "selector": names.selector(), "ports": _proxy_ports()},
    }


def render_pdb(gateway: Gateway, names: Names, owner: Owner | None = None) -> dict[str, Any]:
    """At most one gateway pod down at a time for voluntary disruptions (drains).

    With several replicas that keeps at least one serving; with one replica it still lets
    a node drain proceed rather than block it forever.
    """
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(names, owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": names.selector()}},
    }


def render_hpa(gateway: Gateway, names: Names, owner: Owner | None = None) -> dict[str, Any] | None:
    autoscaling = _mapping(_workload(gateway).get("autoscaling"))
    if not autoscaling:
        return None
    max_replicas = int(autoscaling.get("maxReplicas", 10))
    min_replicas = min(int(autoscaling.get("minReplicas", 2)), max_replicas)
    target = int(autoscaling.get("targetCPUUtilizationPercentage", 70))
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": object_meta(names, owner),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": names.workload,
            },
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": target},
                    },
                }
            ],
        },
    }


def render_workload(
    gateway: Gateway,
    names: Names,
    *,
    image: str = DEFAULT_IMAGE,
    owner: Owner | None = None,
    current_replicas: int | None = None,
    network: ClusterNetwork | None = None,
) -> list[dict[str, Any]]:
    """Everything but the bundle ConfigMap, in the order they should be applied."""
    network = network or ClusterNetwork()
    objects = [
        render_service_account(names, owner),
        render_role(names, owner),
        render_role_binding(names, owner),
        render_deployment(
            gateway, names, image=image, owner=owner, current_replicas=current_replicas
        ),
        render_service(gateway, names, owner),
        render_cluster_service(names, owner),
        render_proxy_env(
            network=network,
            host=names.proxy_host(network.domain),
            port=PROXY_PORT,
            extra_no_proxy=_proxy_env_extras(gateway),
            meta=object_meta(names, owner, names.proxy_env),
        ),
        render_pdb(gateway, names, owner),
    ]
    hpa = render_hpa(gateway, names, owner)
    if hpa is not None:
        objects.append(hpa)
    return objects
