"""What every rendered object shares: names, labels, selectors, ports and quantities."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from bastion.deploy.values import Peer, Values

Obj = dict[str, Any]

UID = 10001  # the image's user (Dockerfile)
SECRETS_DIR = "/run/secrets/bastion"
SVID_DIR = "/run/svid"
HTTPS_DIR = "/run/https"  # the public listeners' certificate (api, gateway)
# SPIRE: the SPIFFE CSI driver's directory with the agent's Workload API socket
# (the SPIRE chart's convention), and spiffe-helper's configuration and limits.
WORKLOAD_API_DIR = "/spiffe-workload-api"
WORKLOAD_API_SOCKET = f"{WORKLOAD_API_DIR}/spire-agent.sock"
SPIFFE_HELPER = "bastion-spiffe-helper"
SPIFFE_HELPER_DIR = "/run/spiffe-helper"
SPIFFE_HELPER_HEALTH_PORT = 8081
SPIFFE_HELPER_LIMITS = {"cpu": "100m", "memory": "64Mi"}
PUBLIC = ("api", "gateway")
DB_CLUSTER = "bastion-db"
# The Secrets that ExternalSecrets (or the CSI driver) fill from the store.
DATABASE_KEYS = "bastion-database"
MASTER_KEYS = "bastion-master-key"
CA_KEYS = "bastion-workload-ca"
WORKLOAD_LABEL = "bastion.dev/workload"
TENANT_LABEL = "bastion.dev/tenant"
ENV_LABEL = "bastion.dev/environment"


def environment_namespace(values: Values) -> str:
    return f"bastion-{values.environment}"


def tenant_namespace(values: Values, tenant: str) -> str:
    return f"bastion-{values.environment}-t-{tenant}"


def object_meta(name: str, namespace: str | None, values: Values, **labels: str) -> Obj:
    meta: Obj = {
        "name": name,
        "labels": {
            "app.kubernetes.io/name": "bastion",
            "app.kubernetes.io/managed-by": "bastion-deploy",
            ENV_LABEL: values.environment,
            **labels,
        },
    }
    if namespace:
        meta["namespace"] = namespace
    return meta


def label_selector(labels: dict[str, str]) -> Obj:
    return {"matchLabels": dict(labels)}


def peer_selector(peer: Peer) -> Obj:
    out: Obj = {"namespaceSelector": label_selector(peer.namespace_labels)}
    if peer.pod_labels:
        out["podSelector"] = label_selector(peer.pod_labels)
    return out


def tcp_ports(*ports: int) -> list[Obj]:
    return [{"protocol": "TCP", "port": p} for p in ports]


# -- quantities (Kubernetes resource.Quantity, the suffixes the values allow) ----

_SUFFIX = {
    "m": Decimal("0.001"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
}


def quantity(text: str) -> Decimal:
    number = text.rstrip("KMGTikm")
    return Decimal(number) * _SUFFIX[text[len(number) :]]
