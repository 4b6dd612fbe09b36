"""A Kustomize base and an environment overlay around :func:`render`'s objects.

``bastion deploy render --kustomize`` writes, under the output folder::

    base/kustomization.yaml                     resources: every rendered object
    base/<namespace>/<kind>-<name>.yaml         the plain rendering, unchanged
    overlays/<environment>/kustomization.yaml   the image and the replica counts

The base is the whole rendering (pinned image included), so it validates and
passes ``bastion check manifests`` on its own. The overlay restates what a
delivery pipeline changes between renders: the image, by digest (or tag), and
each workload's replicas, so ``kustomize edit set image`` / ``set replicas``
there needs no re-render; ``kubectl apply -k overlays/<environment>`` gives
exactly the objects of :func:`render`.

The base sets no ``namespace``: its objects span the environment's namespace
and each isolated tenant's, and each carries its own (cluster-scoped ones
none). Fields used, of ``kustomize.config.k8s.io/v1beta1`` Kustomization:
``resources``, ``images``, ``replicas`` (Deployments) and ``patches`` with an
RFC 6902 JSON Patch for the gateway's Rollout, which the ``replicas`` field
does not reach (it knows Deployment, ReplicaSet, StatefulSet and
ReplicationController only).
"""

from __future__ import annotations

from typing import Any

import yaml

from bastion.deploy.objects import Obj
from bastion.deploy.render import dump
from bastion.deploy.values import Values

API_VERSION = "kustomize.config.k8s.io/v1beta1"
BASE = "base"
# Kinds whose spec.replicas the kustomization's `replicas` field sets.
REPLICAS_KINDS = ("Deployment", "ReplicaSet", "StatefulSet", "ReplicationController")


def overlay_dir(values: Values) -> str:
    return f"overlays/{values.environment}"


def _yaml(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def _replica_counts(objects: list[Obj]) -> dict[tuple[str, str, str], int]:
    """``{(apiVersion, kind, name): replicas}``; the overlay names workloads, not
    namespaces, so one name must have one count across namespaces."""
    counts: dict[tuple[str, str, str], int] = {}
    for obj in objects:
        replicas = (obj.get("spec") or {}).get("replicas")
        if obj["kind"] not in (*REPLICAS_KINDS, "Rollout") or replicas is None:
            continue
        key = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
        if counts.setdefault(key, replicas) != replicas:
            raise ValueError(f"{key[1]} {key[2]} has different replicas in two namespaces")
    return counts


def _overlay(values: Values, objects: list[Obj]) -> Obj:
    image: dict[str, str] = {"name": values.image.repository}
    if values.image.digest:
        image["digest"] = values.image.digest
    else:
        image["newTag"] = str(values.image.tag)
    counts = _replica_counts(objects)
    patches = []
    for (api_version, kind, name), count in counts.items():
        if kind in REPLICAS_KINDS:
            continue
        group, _, version = api_version.rpartition("/")
        operations = [{"op": "replace", "path": "/spec/replicas", "value": count}]
        patches.append(
            {
                "target": {"group": group, "version": version, "kind": kind, "name": name},
                "patch": _yaml(operations),
            }
        )
    overlay: Obj = {
        "apiVersion": API_VERSION,
        "kind": "Kustomization",
        "resources": [f"../../{BASE}"],
        "images": [image],
        "replicas": [
            {"name": name, "count": count}
            for (_, kind, name), count in counts.items()
            if kind in REPLICAS_KINDS
        ],
    }
    if patches:
        overlay["patches"] = patches
    return overlay


def kustomize(values: Values, objects: list[Obj]) -> dict[str, str]:
    """``{relative path: YAML}``: the base (one file per object plus its
    kustomization) and the environment's overlay."""
    files = {f"{BASE}/{path}": text for path, text in dump(objects).items()}
    base = {
        "apiVersion": API_VERSION,
        "kind": "Kustomization",
        "resources": [path.removeprefix(f"{BASE}/") for path in files],
    }
    files[f"{BASE}/kustomization.yaml"] = _yaml(base)
    files[f"{overlay_dir(values)}/kustomization.yaml"] = _yaml(_overlay(values, objects))
    return files
