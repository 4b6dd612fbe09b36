"""``bastion check manifests``: Kubernetes manifests validated offline and linted.

Validation: core kinds against the Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships (strict: an unknown field is an error), custom
resources against the openAPIV3 schemas of their CRDs vendored in
``crd_schemas/`` (cert-manager, Argo Rollouts, External Secrets,
CloudNativePG, the Secrets Store CSI driver, SPIRE; see its README).

Lints: what the Kubernetes Pod Security Standards' "restricted" profile asks
of every pod (non-root, no privilege escalation, all capabilities dropped,
RuntimeDefault seccomp, no host namespaces or hostPath), plus a read-only
root filesystem, requests and limits, probes, images pinned, no
service-account token, no literal secret in a Secret, env or ConfigMap, and a
default-deny NetworkPolicy (both directions) in every namespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import yaml
from kubernetes_validate.utils import schema_contents

from bastion.check.findings import Finding, Rule
from bastion.secret_formats import find_secrets, is_reference

# The Kubernetes release whose schemas core objects are checked against
# (strict: kubernetes-validate's schemas that refuse unknown fields).
KUBERNETES_VERSION = "1.33.0"
_CORE_DIR = f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict"

RULES = {
    r.id: r
    for r in (
        Rule(
            "schema-invalid",
            "error",
            "The object does not validate against its Kubernetes or CRD schema",
            "Fix the field the message names; the API server would refuse it.",
        ),
        Rule(
            "schema-unknown",
            "warning",
            "No schema is known for this apiVersion and kind",
            "Use a current apiVersion, or vendor the CRD's schema next to the others.",
        ),
        Rule(
            "unparseable",
            "error",
            "The file is not valid YAML or an object lacks apiVersion, kind or metadata.name",
            "Fix the file; nothing in it was checked.",
        ),
        Rule(
            "run-as-root",
            "error",
            "A container may run as root",
            "Set runAsNonRoot: true and a non-zero runAsUser (pod or container).",
        ),
        Rule(
            "privilege-escalation",
            "error",
            "A container may gain privileges (allowPrivilegeEscalation not false)",
            "Set allowPrivilegeEscalation: false.",
        ),
        Rule(
            "writable-root-filesystem",
            "error",
            "A container's root filesystem is writable",
            "Set readOnlyRootFilesystem: true; mount an emptyDir where it must write.",
        ),
        Rule(
            "capabilities-not-dropped",
            "error",
            "A container keeps Linux capabilities",
            "Set capabilities.drop: [ALL] and add none.",
        ),
        Rule(
            "seccomp-unconfined",
            "error",
            "A container runs without a RuntimeDefault or Localhost seccomp profile",
            "Set seccompProfile.type: RuntimeDefault on the pod.",
        ),
        Rule(
            "host-access",
            "error",
            "A pod is privileged or reaches the host (hostPath, hostNetwork/PID/IPC, hostPort)",
            "Remove it; a workload needing the host does not belong in a tenant namespace.",
        ),
        Rule(
            "resources-missing",
            "error",
            "A container lacks CPU or memory requests or limits",
            "Set requests and limits for cpu and memory, inside the namespace's quota.",
        ),
        Rule(
            "probes-missing",
            "warning",
            "A container has no liveness or no readiness probe",
            "Probe /healthz (liveness) and /readyz (readiness).",
        ),
        Rule(
            "image-unpinned",
            "error",
            "An image has no tag, or 'latest'",
            "Pin the image by digest (@sha256:...).",
        ),
        Rule(
            "image-tag-not-digest",
            "note",
            "An image is pinned by tag, which its registry can move",
            "Prefer a digest (@sha256:...), or sign and verify the tag.",
        ),
        Rule(
            "service-account-token",
            "warning",
            "A pod mounts a Kubernetes API token it likely never uses",
            "Set automountServiceAccountToken: false on the pod or its ServiceAccount.",
        ),
        Rule(
            "literal-secret",
            "error",
            "A secret value is written in the manifest (Secret data, env value or ConfigMap)",
            "Reference it instead: an ExternalSecret, the CSI driver, or secretKeyRef.",
        ),
        Rule(
            "default-deny-missing",
            "error",
            "A namespace has no default-deny NetworkPolicy for both ingress and egress",
            "Add a NetworkPolicy with podSelector: {} and policyTypes [Ingress, Egress].",
        ),
    )
}

_POD_TEMPLATE_KINDS = {
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "Rollout",
}
_CRD_SCHEMAS = files("bastion.check") / "crd_schemas"


# -- reading --------------------------------------------------------------------


def read_documents(root: Path) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(relative path, line, object)`` for every YAML/JSON document under ``root``.

    An unparseable file yields ``(path, line, None)``."""
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    for path in paths:
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            continue
        relative = path.name if root.is_file() else path.relative_to(root).as_posix()
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    break
                document = loader.construct_document(node)
                if document is not None:  # an empty document, as kubectl skips it
                    yield relative, node.start_mark.line + 1, document
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            yield relative, (mark.line + 1) if mark else 1, None
        finally:
            loader.dispose()


# -- schemas --------------------------------------------------------------------


@cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator | None:
    group, _, version = api_version.rpartition("/")
    resource = _CRD_SCHEMAS / f"{group}_{version}_{kind}.json".lower()
    if not resource.is_file():
        return None
    return jsonschema.Draft7Validator(json.loads(resource.read_text(encoding="utf-8")))


def schema_errors(obj: dict[str, Any]) -> list[str] | None:
    """Return the schema errors of ``obj`` ([] when valid), or None when no schema is known."""
    api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
    crd = _crd_validator(api_version, kind) if "." in api_version.split("/")[0] else None
    if crd is not None:
        errors = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
            for e in sorted(crd.iter_errors(obj), key=lambda e: list(e.absolute_path))
        ]
        template = (obj.get("spec") or {}).get("template")
        if kind == "Rollout" and isinstance(template, dict):
            # The Rollout CRD leaves its pod template unchecked; it is a core
            # PodTemplateSpec, so check it as a Deployment's.
            errors += (
                schema_errors(
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "metadata": {"name": "rollout-template"},
                        "spec": {"selector": obj["spec"].get("selector"), "template": template},
                    }
                )
                or []
            )
        return errors
    validator = _core_validator(api_version, kind)
    if validator is None:
        return None
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


@cache
def _core_definitions() -> referencing.Registry[Any]:
    definitions = schema_contents(f"{_CORE_DIR}/_definitions.json", KUBERNETES_VERSION)
    return referencing.Resource.from_contents(definitions) @ referencing.Registry()


@cache
def _core_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    """The strict schema of a core kind, as kubernetes-validate finds it (cached:
    its own ``validate`` re-reads a 1 MB definitions file on every call)."""
    # rbac.authorization.k8s.io/v1 -> rbac-v1, apps/v1 -> apps-v1, v1 -> v1
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = schema_contents(f"{_CORE_DIR}/{kind.lower()}-{group}.json", KUBERNETES_VERSION)
    except FileNotFoundError:
        return None
    registry = referencing.Resource.from_contents(schema) @ _core_definitions()
    return jsonschema.Draft202012Validator(schema, registry=registry)


# -- pod lints ------------------------------------------------------------------


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec inside a Pod, a workload with a template, or a CronJob."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return spec if isinstance(spec, dict) else None
    if kind == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
        return ((spec.get("template") or {}).get("spec")) or None
    if kind in _POD_TEMPLATE_KINDS:
        return ((spec.get("template") or {}).get("spec")) or None
    return None


def _containers(pod: dict[str, Any]) -> Iterator[tuple[dict[str, Any], bool]]:
    for c in pod.get("containers") or ():
        yield c, True
    for c in pod.get("initContainers") or ():
        yield c, False


def _pod_findings(pod: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Yield ``(rule, message)`` for one pod spec."""
    pod_security = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            yield "host-access", f"{flag}: true"
    for volume in pod.get("volumes") or ():
        if "hostPath" in volume:
            yield "host-access", f"volume {volume.get('name')} is a hostPath"
    if pod.get("automountServiceAccountToken") is not False:
        yield "service-account-token", "automountServiceAccountToken is not false"
    for c, main in _containers(pod):
        name = c.get("name", "?")
        sc = c.get("securityContext") or {}

        def setting(key: str, sc: dict[str, Any] = sc) -> Any:
            return sc.get(key, pod_security.get(key))

        if setting("runAsNonRoot") is not True or setting("runAsUser") == 0:
            yield "run-as-root", f"container {name} may run as root"
        if sc.get("allowPrivilegeEscalation") is not False:
            yield "privilege-escalation", f"container {name}: allowPrivilegeEscalation not false"
        if sc.get("privileged"):
            yield "host-access", f"container {name} is privileged"
        if sc.get("readOnlyRootFilesystem") is not True:
            yield "writable-root-filesystem", f"container {name}: root filesystem writable"
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or ()) or caps.get("add"):
            yield "capabilities-not-dropped", f"container {name} keeps capabilities"
        seccomp = (setting("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            yield "seccomp-unconfined", f"container {name}: seccomp {seccomp or 'unset'}"
        for port in c.get("ports") or ():
            if port.get("hostPort"):
                yield "host-access", f"container {name} binds hostPort {port['hostPort']}"
        resources = c.get("resources") or {}
        missing = [
            f"{part}.{what}"
            for part in ("requests", "limits")
            for what in ("cpu", "memory")
            if what not in (resources.get(part) or {})
        ]
        if missing:
            yield "resources-missing", f"container {name} lacks {', '.join(missing)}"
        if main and not (c.get("livenessProbe") and c.get("readinessProbe")):
            yield "probes-missing", f"container {name} lacks a liveness or readiness probe"
        image = str(c.get("image", ""))
        last = image.rsplit("/", 1)[-1]
        if "@sha256:" not in image:
            if ":" not in last or last.endswith(":latest"):
                yield "image-unpinned", f"container {name}: image {image or '(none)'} floats"
            else:
                yield "image-tag-not-digest", f"container {name}: image pinned by tag only"
        for env in c.get("env") or ():
            value = env.get("value")
            if isinstance(value, str) and _looks_secret(str(env.get("name", "")), value):
                yield "literal-secret", f"container {name}: env {env.get('name')} holds a secret"


def _looks_secret(name: str, value: str) -> bool:
    if name.upper().endswith("_REF"):
        return not is_reference(value)
    if "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        userinfo = value.split("://", 1)[1].split("@", 1)[0]
        if ":" in userinfo:
            return True  # a password in a URL (RFC 3986 section 3.2.1)
    return any(True for _ in find_secrets(f"{name}={value}"))


def _object_findings(obj: dict[str, Any]) -> Iterator[tuple[str, str]]:
    kind = obj.get("kind")
    if kind == "Secret" and (obj.get("data") or obj.get("stringData")):
        yield "literal-secret", "a Secret with its values written in the manifest"
    if kind == "ConfigMap":
        for key, value in (obj.get("data") or {}).items():
            if isinstance(value, str) and _looks_secret(str(key), value):
                yield "literal-secret", f"ConfigMap key {key} holds a secret"
    pod = pod_spec(obj)
    if pod is not None:
        yield from _pod_findings(pod)


def _is_default_deny(obj: dict[str, Any]) -> set[str]:
    """The directions ``obj`` denies by default for its whole namespace."""
    if obj.get("kind") != "NetworkPolicy" or obj.get("apiVersion") != "networking.k8s.io/v1":
        return set()
    spec = obj.get("spec") or {}
    if spec.get("podSelector") not in ({}, None) and spec.get("podSelector") != {"matchLabels": {}}:
        return set()
    types = set(spec.get("policyTypes") or ["Ingress"])
    return {t for t in types if not spec.get(t.lower())}


# -- the check ------------------------------------------------------------------


def check_manifests(root: Path) -> list[Finding]:
    """Return every finding of :data:`RULES` for the manifests under ``root``."""
    findings: list[Finding] = []
    namespaces: dict[str, tuple[str, int]] = {}
    denied: dict[str, set[str]] = {}

    def add(rule: str, subject: str, message: str, path: str, line: int) -> None:
        findings.append(Finding(RULES[rule], subject, message, path=path, line=line))

    for path, line, obj in read_documents(root):
        if obj is None:
            add("unparseable", path, "not valid YAML", path, line)
            continue
        if not isinstance(obj, dict) or not obj.get("kind") or not obj.get("apiVersion"):
            add("unparseable", f"{path}:{line}", "not a Kubernetes object", path, line)
            continue
        if str(obj["apiVersion"]).startswith("kustomize.config.k8s.io/"):
            continue  # build instructions (a kustomization), not an object to apply
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace", "default"))
        name = str(meta.get("name", "?"))
        subject = f"{obj['kind']}/{namespace}/{name}"
        errors = schema_errors(obj)
        if errors is None:
            add("schema-unknown", subject, f"{obj['apiVersion']} {obj['kind']}", path, line)
        for error in errors or ():
            add("schema-invalid", subject, error[:300], path, line)
        for rule, message in _object_findings(obj):
            add(rule, subject, message, path, line)
        if obj["kind"] == "Namespace":
            namespaces.setdefault(name, (path, line))
        elif pod_spec(obj) is not None or obj["kind"] == "NetworkPolicy":
            namespaces.setdefault(namespace, (path, line))
        denied.setdefault(namespace, set()).update(_is_default_deny(obj))
    for namespace, (path, line) in sorted(namespaces.items()):
        missing = {"Ingress", "Egress"} - denied.get(namespace, set())
        if missing:
            add(
                "default-deny-missing",
                f"Namespace/{namespace}",
                f"no default-deny for {' and '.join(sorted(missing)).lower()}",
                path,
                line,
            )
    return findings
