"""Which pod can reach which: NetworkPolicies evaluated with Kubernetes' semantics.

From the Kubernetes documentation ("Network Policies", networking.k8s.io/v1):

* A pod is isolated for ingress (egress) once any policy in its namespace
  selects it with ``Ingress`` (``Egress``) among its ``policyTypes``; a policy
  without ``policyTypes`` has ``Ingress``, plus ``Egress`` if it has egress rules.
* A connection is allowed when the source may send it (not egress-isolated,
  or some egress rule of a policy selecting it matches) AND the destination
  may take it (not ingress-isolated, or some ingress rule matches): policies
  only add, the allowed set is the union of the rules.
* A rule with no ``from``/``to`` matches every peer; with no ``ports``, every
  port. A peer is a ``podSelector`` (pods of the policy's namespace), a
  ``namespaceSelector`` (all pods of the namespaces it selects), both (those
  pods in those namespaces), or an ``ipBlock`` (addresses outside the
  cluster, minus ``except``). Ports match protocol (default TCP), number or
  container port name, up to ``endPort``.

The model: one representative pod per workload (its labels, its namespace's
labels, its container ports) and named external endpoints (an address and
ports). Pods are matched by selectors, external endpoints by ipBlocks only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Port:
    number: int
    protocol: str = "TCP"
    name: str | None = None


@dataclass(frozen=True)
class Pod:
    """A workload's pods: where they are, their labels and the ports they listen on."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str]
    ports: tuple[Port, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class External:
    """An address outside the cluster (a provider, a database) and its ports."""

    name: str
    address: str
    ports: tuple[Port, ...] = (Port(443),)

    @property
    def id(self) -> str:
        return f"external/{self.name}"


@dataclass(frozen=True, order=True)
class Flow:
    source: str
    destination: str
    protocol: str
    port: int


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels`` (an empty selector matches all)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or ():
        key, operator = expression["key"], expression["operator"]
        values = set(expression.get("values") or ())
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
        if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {operator}")
    return True


def _policy_types(spec: Obj) -> set[str]:
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


@dataclass
class NetworkPolicies:
    """The NetworkPolicy objects of a rendering, ready to answer :meth:`allows`."""

    policies: list[Obj] = field(default_factory=list)

    @classmethod
    def of(cls, objects: Iterable[Obj]) -> NetworkPolicies:
        return cls(
            [
                o
                for o in objects
                if o.get("kind") == "NetworkPolicy"
                and o.get("apiVersion") == "networking.k8s.io/v1"
            ]
        )

    def _selecting(self, pod: Pod, direction: str) -> list[Obj]:
        return [
            p
            for p in self.policies
            if p["metadata"].get("namespace", "default") == pod.namespace
            and direction in _policy_types(p.get("spec") or {})
            and selects((p.get("spec") or {}).get("podSelector"), pod.labels)
        ]

    @staticmethod
    def _peer_matches(peer: Obj, policy_namespace: str, other: Pod | External) -> bool:
        if "ipBlock" in peer:
            if not isinstance(other, External):
                return False
            address = ipaddress.ip_address(other.address)
            block = peer["ipBlock"]
            if address not in ipaddress.ip_network(block["cidr"], strict=False):
                return False
            return not any(
                address in ipaddress.ip_network(e, strict=False) for e in block.get("except") or ()
            )
        if not isinstance(other, Pod):
            return False
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], other.namespace_labels):
                return False
        elif other.namespace != policy_namespace:
            return False
        return selects(peer.get("podSelector"), other.labels)

    @staticmethod
    def _port_matches(rule_ports: list[Obj] | None, port: Port) -> bool:
        if not rule_ports:
            return True
        for p in rule_ports:
            if p.get("protocol", "TCP") != port.protocol:
                continue
            wanted = p.get("port")
            if wanted is None:
                return True
            if isinstance(wanted, str):
                if wanted == port.name:
                    return True
                continue
            if int(wanted) <= port.number <= int(p.get("endPort") or wanted):
                return True
        return False

    def _allowed(self, pod: Pod, direction: str, other: Pod | External, port: Port) -> bool:
        policies = self._selecting(pod, direction)
        if not policies:
            return True  # not isolated in this direction
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in policies:
            namespace = policy["metadata"].get("namespace", "default")
            for rule in (policy.get("spec") or {}).get(key) or ():
                peers = rule.get(peers_key)
                if peers and not any(self._peer_matches(p, namespace, other) for p in peers):
                    continue
                if self._port_matches(rule.get("ports"), port):
                    return True
        return False

    def allows(self, source: Pod | External, destination: Pod | External, port: Port) -> bool:
        """Whether ``source`` can open a connection to ``destination`` on ``port``."""
        if isinstance(source, Pod) and not self._allowed(source, "Egress", destination, port):
            return False
        if isinstance(destination, Pod):
            return self._allowed(destination, "Ingress", source, port)
        return True

    def flows(self, pods: Iterable[Pod], externals: Iterable[External] = ()) -> set[Flow]:
        """Every allowed (source, destination, protocol, port): pod to pod, pod to
        external, external to pod; each destination's own ports only."""
        pods, externals = list(pods), list(externals)
        everyone: list[Pod | External] = [*pods, *externals]
        out: set[Flow] = set()
        for source in everyone:
            for destination in everyone:
                if source is destination or (
                    isinstance(source, External) and isinstance(destination, External)
                ):
                    continue
                for port in destination.ports:
                    if self.allows(source, destination, port):
                        out.add(Flow(source.id, destination.id, port.protocol, port.number))
        return out


def workload_pods(objects: Iterable[Obj]) -> list[Pod]:
    """One :class:`Pod` per rendered workload (Deployment, Rollout, CloudNativePG Cluster)."""
    objects = list(objects)
    namespace_labels = {
        o["metadata"]["name"]: {
            **o["metadata"].get("labels", {}),
            # Set by the API server on every namespace (Kubernetes >= 1.22).
            "kubernetes.io/metadata.name": o["metadata"]["name"],
        }
        for o in objects
        if o.get("kind") == "Namespace"
    }
    pods = []
    for o in objects:
        meta = o["metadata"]
        namespace = meta.get("namespace", "default")
        labels = namespace_labels.get(namespace, {"kubernetes.io/metadata.name": namespace})
        if o.get("kind") in ("Deployment", "Rollout"):
            template = o["spec"]["template"]
            ports = tuple(
                Port(p["containerPort"], p.get("protocol", "TCP"), p.get("name"))
                for c in template["spec"]["containers"]
                for p in c.get("ports") or ()
            )
            name = template["metadata"]["labels"].get("bastion.dev/workload", meta["name"])
            pods.append(Pod(namespace, name, template["metadata"]["labels"], labels, ports))
        elif o.get("kind") == "Cluster" and o.get("apiVersion") == "postgresql.cnpg.io/v1":
            # CloudNativePG labels its instances cnpg.io/cluster=<name>; they
            # listen on 5432, the status port 8000 and metrics on 9187.
            pods.append(
                Pod(
                    namespace,
                    "postgres",
                    {"cnpg.io/cluster": meta["name"]},
                    labels,
                    (Port(5432), Port(8000), Port(9187)),
                )
            )
    return pods
