"""One namespace's guard rails: the Namespace (Pod Security "restricted"), the
ResourceQuota and LimitRange, and the NetworkPolicies (default deny, then one
policy per flow of the table in docs/deploy.md; :mod:`bastion.deploy.netpol`
evaluates them)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from bastion.deploy.objects import (
    DB_CLUSTER,
    SPIFFE_HELPER_LIMITS,
    WORKLOAD_LABEL,
    Obj,
    environment_namespace,
    label_selector,
    object_meta,
    peer_selector,
    quantity,
    tcp_ports,
    tenant_namespace,
)
from bastion.deploy.values import Values, ValuesError, Workload

# -- one namespace --------------------------------------------------------------


def namespace_object(name: str, values: Values, **labels: str) -> Obj:
    meta = object_meta(name, None, values, **labels)
    # Pod Security Admission: the "restricted" profile refuses any pod that
    # could escape these settings, whatever else is applied later.
    meta["labels"].update(
        {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }
    )
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def guard_rails(namespace: str, values: Values, workloads: dict[str, Workload]) -> list[Obj]:
    """The ResourceQuota and the LimitRange; refuse values where the HPAs cannot fit."""
    # Each pod's limits: Bastion's container, and with SPIRE the spiffe-helper sidecar's.
    spire = values.mtls.provider == "spire"
    helper_cpu = quantity(SPIFFE_HELPER_LIMITS["cpu"]) if spire else Decimal()
    helper_memory = quantity(SPIFFE_HELPER_LIMITS["memory"]) if spire else Decimal()
    cpu = sum(
        ((quantity(w.cpu_limit) + helper_cpu) * (w.max_replicas + 1) for w in workloads.values()),
        Decimal(),
    )
    memory = sum(
        (
            (quantity(w.memory_limit) + helper_memory) * (w.max_replicas + 1)
            for w in workloads.values()
        ),
        Decimal(),
    )
    pods = sum(w.max_replicas + 1 for w in workloads.values())
    if namespace == environment_namespace(values) and values.database.mode == "cloudnativepg":
        pods += values.database.instances + 1
    short = [
        what
        for what, need, have in (
            ("cpu", cpu, quantity(values.quota.cpu)),
            ("memory", memory, quantity(values.quota.memory)),
            ("pods", Decimal(pods), Decimal(values.quota.pods)),
        )
        if need > have
    ]
    if short:
        raise ValuesError(
            [
                (
                    f"quota.{what}",
                    f"too small for {namespace}: each workload at max_replicas + 1 surge must fit",
                )
                for what in short
            ]
        )
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": object_meta("bastion-quota", namespace, values),
        "spec": {
            "hard": {
                "requests.cpu": values.quota.cpu,
                "limits.cpu": values.quota.cpu,
                "requests.memory": values.quota.memory,
                "limits.memory": values.quota.memory,
                "pods": str(values.quota.pods),
                "services.loadbalancers": "0",
                "services.nodeports": "0",
            }
        },
    }
    limits = {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": object_meta("bastion-limits", namespace, values),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "default": {"cpu": "500m", "memory": "512Mi"},
                    "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                    "max": {
                        "cpu": max((w.cpu_limit for w in workloads.values()), key=quantity),
                        "memory": max((w.memory_limit for w in workloads.values()), key=quantity),
                    },
                }
            ]
        },
    }
    return [quota, limits]


def network_policies(namespace: str, values: Values, workloads: tuple[str, ...]) -> list[Obj]:
    """Default deny, then one policy per needed flow (see the module docstring)."""
    env_ns = environment_namespace(values)
    ports = values.ports
    isolated = namespace != env_ns

    def policy(name: str, pods: dict[str, str], spec: Obj) -> Obj:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": object_meta(name, namespace, values),
            "spec": {"podSelector": label_selector(pods) if pods else {}, **spec},
        }

    def workload(name: str) -> dict[str, str]:
        return {WORKLOAD_LABEL: name}

    api_pods = {
        "namespaceSelector": label_selector({"kubernetes.io/metadata.name": env_ns}),
        "podSelector": label_selector(workload("api")),
    }
    gateway_namespaces = [env_ns] + [tenant_namespace(values, t) for t in values.isolated_tenants]
    out = [
        policy("default-deny", {}, {"policyTypes": ["Ingress", "Egress"]}),
        policy(
            "allow-dns",
            {},
            {
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [peer_selector(values.dns)],
                        "ports": [
                            {"protocol": "UDP", "port": 53},
                            {"protocol": "TCP", "port": 53},
                        ],
                    }
                ],
            },
        ),
        policy(
            "allow-metrics-scrape",
            {},
            {
                "policyTypes": ["Ingress"],
                # Each pod's internal listener (named "internal"), which serves
                # /metrics over mTLS to the scraper's SPIFFE ID only.
                "ingress": [
                    {
                        "from": [peer_selector(values.scraper)],
                        "ports": [{"protocol": "TCP", "port": "internal"}],
                    }
                ],
            },
        ),
        policy(
            "gateway-from-api",
            workload("gateway"),
            {
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": [api_pods], "ports": tcp_ports(ports.gateway, ports.gateway_internal)}
                ],
            },
        ),
    ]
    if values.providers:
        out.append(
            policy(
                "gateway-to-providers",
                workload("gateway"),
                {
                    "policyTypes": ["Egress"],
                    "egress": [
                        {"to": [{"ipBlock": {"cidr": p.cidr}}], "ports": tcp_ports(*p.ports)}
                        for p in values.providers
                    ],
                },
            )
        )
    if not isolated:
        out += [
            policy(
                "api-from-ingress",
                workload("api"),
                {
                    "policyTypes": ["Ingress"],
                    "ingress": [
                        {"from": [peer_selector(values.ingress)], "ports": tcp_ports(ports.api)}
                    ],
                },
            ),
            policy(
                "api-to-gateway",
                workload("api"),
                {
                    "policyTypes": ["Egress"],
                    "egress": [
                        {
                            "to": [
                                {
                                    "namespaceSelector": label_selector(
                                        {"kubernetes.io/metadata.name": ns}
                                    ),
                                    "podSelector": label_selector(workload("gateway")),
                                }
                                for ns in gateway_namespaces
                            ],
                            "ports": tcp_ports(ports.gateway, ports.gateway_internal),
                        }
                    ],
                },
            ),
        ]
    out.append(_database_egress(namespace, values, workloads, policy))
    if not isolated and values.database.mode == "cloudnativepg":
        out.extend(_cnpg_policies(values, gateway_namespaces, policy))
    return out


def _database_egress(
    namespace: str, values: Values, workloads: tuple[str, ...], policy: Any
) -> Obj:
    db = values.database
    if db.mode == "external":
        assert db.cidr is not None  # checked by Database
        to: list[Obj] = [{"ipBlock": {"cidr": db.cidr}}]
    else:
        to = [
            {
                "namespaceSelector": label_selector(
                    {"kubernetes.io/metadata.name": environment_namespace(values)}
                ),
                "podSelector": label_selector({"cnpg.io/cluster": DB_CLUSTER}),
            }
        ]
    spec = {"policyTypes": ["Egress"], "egress": [{"to": to, "ports": tcp_ports(db.port)}]}
    selector = {
        "matchExpressions": [{"key": WORKLOAD_LABEL, "operator": "In", "values": list(workloads)}]
    }
    obj: Obj = policy("bastion-to-postgres", {}, spec)
    obj["spec"]["podSelector"] = selector
    return obj


def _cnpg_policies(values: Values, namespaces: list[str], policy: Any) -> list[Obj]:
    """The CloudNativePG instances: Bastion's pods and each other on 5432, the
    operator on its status port, the Kubernetes API for the instance manager."""
    db = values.database
    cluster = {"cnpg.io/cluster": DB_CLUSTER}
    bastion_pods = [
        {
            "namespaceSelector": label_selector({"kubernetes.io/metadata.name": ns}),
            "podSelector": {"matchExpressions": [{"key": WORKLOAD_LABEL, "operator": "Exists"}]},
        }
        for ns in namespaces
    ]
    operator = peer_selector(db.operator)
    return [
        policy(
            "postgres-ingress",
            cluster,
            {
                "policyTypes": ["Ingress"],
                "ingress": [
                    {"from": bastion_pods, "ports": tcp_ports(db.port)},
                    {
                        "from": [{"podSelector": label_selector(cluster)}],
                        "ports": tcp_ports(db.port),
                    },
                    {"from": [operator], "ports": tcp_ports(8000)},
                    {"from": [peer_selector(values.scraper)], "ports": tcp_ports(9187)},
                ],
            },
        ),
        policy(
            "postgres-egress",
            cluster,
            {
                "policyTypes": ["Egress"],
                "egress": [
                    {"to": [{"podSelector": label_selector(cluster)}], "ports": tcp_ports(db.port)},
                    {
                        "to": [{"ipBlock": {"cidr": db.api_server_cidr}}],
                        "ports": tcp_ports(443, 6443),
                    },
                ],
            },
        ),
    ]
