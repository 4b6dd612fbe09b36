"""Values in, Kubernetes objects out: Bastion's manifests as plain data.

One environment namespace runs the api, the gateway (an Argo Rollouts canary)
and the worker; each tenant on the isolated tier gets its own namespace with
its own gateway and worker. Every namespace gets the same guard rails:

* a default-deny NetworkPolicy for both directions, then one policy per
  needed flow (ingress -> api, api -> gateway, gateway -> provider CIDRs,
  Bastion -> PostgreSQL, scraper -> the internal (mTLS) listeners' /metrics,
  everyone -> DNS); the flow table
  these give is in docs/deploy.md and :mod:`bastion.deploy.netpol` computes it;
* Pod Security "restricted" enforced on the namespace, and every pod non-root,
  read-only root filesystem, no capabilities, RuntimeDefault seccomp, no
  service-account token, requests, limits and probes;
* a ResourceQuota and LimitRange sized so every HPA's maximum (plus one
  surge pod per workload) fits, checked here;
* a PodDisruptionBudget per workload;
* X.509-SVIDs with the SPIFFE IDs of :mod:`bastion.identity.workload` from a
  cert-manager CA Issuer, or a SPIRE ClusterSPIFFEID;
* secrets only as references: ExternalSecrets (or a CSI SecretProviderClass)
  naming keys in the store, mounted as files the settings read by
  ``file:`` reference; the database password likewise, or the Secret that
  CloudNativePG writes for its Cluster.

The pieces: :mod:`.objects` (shared helpers), :mod:`.namespaces` (guard rails
and NetworkPolicies), :mod:`.workloads`, :mod:`.rollout`, :mod:`.certificates`
and :mod:`.secrets`; this module assembles them.
"""

from __future__ import annotations

from collections.abc import Iterator

import yaml

from bastion.deploy.certificates import scraper_svid, spiffe_helper_config
from bastion.deploy.namespaces import guard_rails, namespace_object, network_policies
from bastion.deploy.objects import TENANT_LABEL, Obj, environment_namespace, tenant_namespace
from bastion.deploy.secrets import database_cluster, secret_references
from bastion.deploy.values import Values
from bastion.deploy.workloads import workload_objects


def _namespace_objects(namespace: str, values: Values, tenant: str | None) -> Iterator[Obj]:
    if tenant:
        yield namespace_object(
            namespace, values, **{TENANT_LABEL: tenant, "bastion.dev/tier": "isolated"}
        )
        workloads = {"gateway": values.gateway, "worker": values.worker}
    else:
        yield namespace_object(namespace, values, **{"bastion.dev/tier": "shared"})
        workloads = {"api": values.api, "gateway": values.gateway, "worker": values.worker}
    yield from guard_rails(namespace, values, workloads)
    yield from network_policies(namespace, values, tuple(workloads))
    yield from secret_references(namespace, values)
    if values.mtls.provider == "spire":
        yield spiffe_helper_config(namespace, values)
    if not tenant:
        yield from database_cluster(values)
        yield scraper_svid(values)
    for name, w in workloads.items():
        yield from workload_objects(name, namespace, values, w, tenant)


def render(values: Values) -> list[Obj]:
    """Every object, environment namespace first, then each isolated tenant's.

    Raise :class:`ValuesError` when the values cannot give a working
    deployment (an HPA maximum that does not fit the quota)."""
    objects = list(_namespace_objects(environment_namespace(values), values, None))
    for tenant in values.isolated_tenants:
        objects.extend(_namespace_objects(tenant_namespace(values, tenant), values, tenant))
    return objects


def file_name(obj: Obj) -> str:
    """Where ``obj`` is written: ``<namespace>/<kind>-<name>.yaml``."""
    meta = obj["metadata"]
    folder = meta["name"] if obj["kind"] == "Namespace" else meta.get("namespace", "_cluster")
    return f"{folder}/{obj['kind'].lower()}-{meta['name']}.yaml"


def dump(objects: list[Obj]) -> dict[str, str]:
    """``{relative path: YAML}`` for :func:`render`'s objects, one object per file."""
    out: dict[str, str] = {}
    for obj in objects:
        path = file_name(obj)
        if path in out:
            raise ValueError(f"two objects would be written to {path}")
        out[path] = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)
    return out
