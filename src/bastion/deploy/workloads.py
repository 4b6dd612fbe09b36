"""The api, gateway and worker: ServiceAccount, Service, Deployment (the gateway's
Rollout is in :mod:`bastion.deploy.rollout`), HPA, PDB and their certificates;
the hardened pod template, its environment and its secret volumes."""

from __future__ import annotations

from bastion.deploy.certificates import https_certificate, svid_objects
from bastion.deploy.objects import (
    DATABASE_KEYS,
    DB_CLUSTER,
    HTTPS_DIR,
    MASTER_KEYS,
    PUBLIC,
    SECRETS_DIR,
    SPIFFE_HELPER,
    SPIFFE_HELPER_DIR,
    SPIFFE_HELPER_HEALTH_PORT,
    SPIFFE_HELPER_LIMITS,
    SVID_DIR,
    TENANT_LABEL,
    UID,
    WORKLOAD_API_DIR,
    WORKLOAD_LABEL,
    Obj,
    environment_namespace,
    label_selector,
    object_meta,
)
from bastion.deploy.rollout import gateway_rollout
from bastion.deploy.values import Values, Workload

# -- workloads ------------------------------------------------------------------


def _container_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(values: Values) -> list[Obj]:
    if values.database.mode == "cloudnativepg":
        env_ns = environment_namespace(values)
        url = f"postgresql://app@{DB_CLUSTER}-rw.{env_ns}.svc:{values.database.port}/app"
    else:
        assert values.database.url is not None
        url = values.database.url
    plain = {
        "BASTION_API_HOST": "0.0.0.0",  # noqa: S104 - inside the pod; NetworkPolicy guards it
        "BASTION_API_PORT": str(values.ports.api),
        "BASTION_GATEWAY_PORT": str(values.ports.gateway),
        "BASTION_GATEWAY_INTERNAL_PORT": str(values.ports.gateway_internal),
        "BASTION_API_INTERNAL_PORT": str(values.ports.api_internal),
        "BASTION_WORKER_INTERNAL_PORT": str(values.ports.worker_internal),
        "BASTION_WORKER_PORT": str(values.ports.worker),
        "BASTION_WORKLOAD_TRUST_DOMAIN": values.mtls.trust_domain,
        # The public URLs, never derived from the bind above: the api issues
        # tokens and the worker receipts under the issuer, the gateway checks
        # both (iss, DPoP htu); bastion.settings refuses the wildcard without them.
        "BASTION_ISSUER": values.public.api_url,
        "BASTION_GATEWAY_PUBLIC_URL": values.public.gateway_url,
        # Replicas share one replay store, so a DPoP proof or a refresh token
        # is single use across the whole deployment, not per pod.
        "BASTION_REPLAY_STORE": "postgres",
        "DATABASE_URL": url,
        # References only: the settings read these files; no value is in the manifest.
        "BASTION_DATABASE_PASSWORD_REF": f"file:{SECRETS_DIR}/database/password",
        "BASTION_MASTER_KEY_REF": f"file:{SECRETS_DIR}/master-key/key",
    }
    return [{"name": k, "value": v} for k, v in plain.items()]


def _secret_volumes(name: str, values: Values) -> tuple[list[Obj], list[Obj]]:
    volumes: list[Obj] = [
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
        {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts: list[Obj] = [
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir of this pod
        {"name": "home", "mountPath": "/var/lib/bastion"},
    ]
    if values.secrets.driver == "csi":
        volumes.append(
            {
                "name": "secrets",
                "csi": {
                    "driver": "secrets-store.csi.k8s.io",
                    "readOnly": True,
                    "volumeAttributes": {"secretProviderClass": "bastion"},
                },
            }
        )
        mounts.append({"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True})
    else:
        for volume, source, items in (
            ("database", DATABASE_KEYS, [{"key": "password", "path": "password"}]),
            ("master-key", MASTER_KEYS, [{"key": "key", "path": "key"}]),
        ):
            volumes.append(
                {
                    "name": volume,
                    "secret": {"secretName": source, "items": items, "defaultMode": 0o400},
                }
            )
            mounts.append(
                {"name": volume, "mountPath": f"{SECRETS_DIR}/{volume}", "readOnly": True}
            )
    if values.mtls.provider == "spire":
        # spiffe-helper (a sidecar, :func:`_spiffe_helper`) writes the files
        # into memory (tmpfs: the key never reaches the node's disk); the
        # SPIFFE CSI driver mounts the agent's Workload API socket for it alone.
        volumes += [
            {"name": "svid", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {
                "name": "spiffe-workload-api",
                "csi": {"driver": "csi.spiffe.io", "readOnly": True},
            },
            {"name": "spiffe-helper", "configMap": {"name": SPIFFE_HELPER}},
        ]
    else:
        # The files bastion.identity.workload.SvidFiles reads (settings.workload_svid_dir);
        # the kubelet swaps them in place when cert-manager renews the Secret.
        items = [
            {"key": "tls.crt", "path": "svid.pem"},
            {"key": "tls.key", "path": "svid.key"},
            {"key": "ca.crt", "path": "bundle.pem"},
        ]
        volumes.append(
            {
                "name": "svid",
                "secret": {
                    "secretName": f"bastion-{name}-svid",
                    "items": items,
                    "defaultMode": 0o400,
                },
            }
        )
    mounts.append({"name": "svid", "mountPath": SVID_DIR, "readOnly": True})
    if name in PUBLIC:
        volumes.append(
            {
                "name": "https",
                "secret": {"secretName": f"bastion-{name}-https", "defaultMode": 0o400},
            }
        )
        mounts.append({"name": "https", "mountPath": HTTPS_DIR, "readOnly": True})
    return volumes, mounts


def _process_env(name: str, values: Values) -> list[Obj]:
    """What differs between the processes: the public listener's certificate
    (api, gateway: HTTPS, bastion.serve.public_tls) and, with cert-manager,
    the SVID files (settings.workload_svid_dir: cert-manager's Secret, or what
    spiffe-helper writes from SPIRE), and for the api the gateway's internal
    Service: a peer's name, where api_host is only the pod's bind address."""
    env: dict[str, str] = {"BASTION_WORKLOAD_SVID_DIR": SVID_DIR}
    if name == "api":
        # The environment's gateway: the api runs in that namespace only.
        env["BASTION_GATEWAY_INTERNAL_HOST"] = (
            f"bastion-gateway.{environment_namespace(values)}.svc"
        )
    if name in PUBLIC:
        env["BASTION_PUBLIC_TLS_CERT_FILE"] = f"{HTTPS_DIR}/tls.crt"
        env["BASTION_PUBLIC_TLS_KEY_FILE"] = f"{HTTPS_DIR}/tls.key"
    return [{"name": k, "value": v} for k, v in env.items()]


def _spiffe_helper(values: Values) -> Obj:
    """The SPIRE sidecar: spiffe-helper in daemon mode (config: the namespace's
    ConfigMap, :func:`bastion.deploy.certificates.spiffe_helper_config`). A native
    sidecar (an init container that keeps running): the pod's Bastion container
    starts only once its startup probe sees the SVID files written."""
    assert values.mtls.spiffe_helper is not None  # the values refuse SPIRE without it

    def probe(path: str, period: int, failures: int) -> Obj:
        return {
            "httpGet": {"path": path, "port": SPIFFE_HELPER_HEALTH_PORT},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        }

    return {
        "name": "spiffe-helper",
        "image": values.mtls.spiffe_helper.reference,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "args": ["-config", f"{SPIFFE_HELPER_DIR}/helper.conf"],
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": dict(SPIFFE_HELPER_LIMITS),
        },
        "startupProbe": probe("/ready", 1, 60),
        "livenessProbe": probe("/live", 10, 3),
        "readinessProbe": probe("/ready", 5, 2),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "svid", "mountPath": SVID_DIR},
            {"name": "spiffe-workload-api", "mountPath": WORKLOAD_API_DIR, "readOnly": True},
            {"name": "spiffe-helper", "mountPath": SPIFFE_HELPER_DIR, "readOnly": True},
        ],
    }


def _pod_template(
    name: str, values: Values, namespace: str, w: Workload, extra: dict[str, str]
) -> Obj:
    ports = values.ports
    port = {"api": ports.api, "gateway": ports.gateway, "worker": ports.worker}[name]
    internal = {
        "api": ports.api_internal,
        "gateway": ports.gateway_internal,
        "worker": ports.worker_internal,
    }[name]
    container_ports = [
        {"name": "http", "containerPort": port, "protocol": "TCP"},
        {"name": "internal", "containerPort": internal, "protocol": "TCP"},
    ]
    volumes, mounts = _secret_volumes(name, values)

    scheme = "HTTPS" if name in PUBLIC else "HTTP"

    def probe(path: str, period: int, failures: int) -> Obj:
        return {
            "httpGet": {"path": path, "port": "http", "scheme": scheme},
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        }

    labels = {WORKLOAD_LABEL: name, "app.kubernetes.io/component": name, **extra}
    sidecars = [_spiffe_helper(values)] if values.mtls.provider == "spire" else []
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "bastion", **labels}},
        "spec": {
            "serviceAccountName": f"bastion-{name}",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": label_selector({WORKLOAD_LABEL: name}),
                }
            ],
            **({"initContainers": sidecars} if sidecars else {}),
            "containers": [
                {
                    "name": name,
                    "image": values.image.reference,
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["serve", name],
                    "ports": container_ports,
                    "env": _env(values) + _process_env(name, values),
                    "resources": {
                        "requests": {"cpu": w.cpu_request, "memory": w.memory_request},
                        "limits": {"cpu": w.cpu_limit, "memory": w.memory_limit},
                    },
                    "startupProbe": probe("/healthz", 2, 30),
                    "livenessProbe": probe("/healthz", 10, 3),
                    "readinessProbe": probe("/readyz", 5, 2),
                    "securityContext": _container_security(),
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def workload_objects(
    name: str, namespace: str, values: Values, w: Workload, tenant: str | None
) -> list[Obj]:
    extra = {TENANT_LABEL: tenant} if tenant else {}
    labels = {WORKLOAD_LABEL: name, "app.kubernetes.io/component": name, **extra}
    selector = label_selector({WORKLOAD_LABEL: name})
    template = _pod_template(name, values, namespace, w, extra)
    out: list[Obj] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": object_meta(f"bastion-{name}", namespace, values, **labels),
            "automountServiceAccountToken": False,
        }
    ]
    ports = [
        {
            "name": "http",
            "port": template["spec"]["containers"][0]["ports"][0]["containerPort"],
            "targetPort": "http",
        }
    ]
    if name == "gateway":
        ports.append(
            {"name": "internal", "port": values.ports.gateway_internal, "targetPort": "internal"}
        )
    out.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": object_meta(f"bastion-{name}", namespace, values, **labels),
            "spec": {"type": "ClusterIP", "selector": {WORKLOAD_LABEL: name}, "ports": ports},
        }
    )
    if name == "gateway":
        out.extend(gateway_rollout(namespace, values, w, labels, selector, template))
        target = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Rollout",
            "name": f"bastion-{name}",
        }
    else:
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": object_meta(f"bastion-{name}", namespace, values, **labels),
                "spec": {
                    "replicas": w.min_replicas,
                    "revisionHistoryLimit": 5,
                    "selector": selector,
                    "strategy": {
                        "type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
                    },
                    "template": template,
                },
            }
        )
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"bastion-{name}"}
    out += [
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": object_meta(f"bastion-{name}", namespace, values, **labels),
            "spec": {
                "scaleTargetRef": target,
                "minReplicas": w.min_replicas,
                "maxReplicas": w.max_replicas,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {
                                "type": "Utilization",
                                "averageUtilization": w.target_cpu_percent,
                            },
                        },
                    }
                ],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": object_meta(f"bastion-{name}", namespace, values, **labels),
            "spec": {"maxUnavailable": 1, "selector": selector},
        },
    ]
    out.extend(svid_objects(name, namespace, values, labels))
    if name in PUBLIC:
        out.append(https_certificate(name, namespace, values, labels))
    return out
