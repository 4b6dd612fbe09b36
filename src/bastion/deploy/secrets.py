"""Secrets as references only: ExternalSecrets or a CSI SecretProviderClass,
and the optional CloudNativePG Cluster."""

from __future__ import annotations

import yaml

from bastion.deploy.objects import (
    CA_KEYS,
    DATABASE_KEYS,
    DB_CLUSTER,
    MASTER_KEYS,
    Obj,
    environment_namespace,
    object_meta,
)
from bastion.deploy.values import Values


def secret_references(namespace: str, values: Values) -> list[Obj]:
    """ExternalSecrets (or one SecretProviderClass) naming keys in the store; no values."""
    s = values.secrets
    wanted: list[tuple[str, str, str]] = [
        (MASTER_KEYS, "key", s.master_key),
        (DATABASE_KEYS, "password", values.database.password_key),
    ]
    if values.mtls.provider == "cert-manager":
        for key in ("tls.crt", "tls.key"):
            wanted.append((CA_KEYS, key, f"{s.workload_ca}#{key}"))
    if s.driver == "csi":
        objects = [
            {
                "objectName": remote,
                "objectAlias": f"{'database' if target == DATABASE_KEYS else 'master-key'}/{key}",
            }
            for target, key, remote in wanted
            if target != CA_KEYS
        ]
        out: list[Obj] = [
            {
                "apiVersion": "secrets-store.csi.x-k8s.io/v1",
                "kind": "SecretProviderClass",
                "metadata": object_meta("bastion", namespace, values),
                "spec": {
                    "provider": s.store,
                    "parameters": {"objects": yaml.safe_dump(objects, sort_keys=True)},
                },
            }
        ]
        wanted = [w for w in wanted if w[0] == CA_KEYS]
    else:
        out = []
    by_secret: dict[str, list[tuple[str, str]]] = {}
    for target, key, remote in wanted:
        by_secret.setdefault(target, []).append((key, remote))
    for target, keys in by_secret.items():
        data = []
        for key, remote in keys:
            path, _, prop = remote.partition("#")
            ref: Obj = {"key": path}
            if prop:
                ref["property"] = prop
            data.append({"secretKey": key, "remoteRef": ref})
        out.append(
            {
                "apiVersion": "external-secrets.io/v1",
                "kind": "ExternalSecret",
                "metadata": object_meta(target, namespace, values),
                "spec": {
                    "refreshInterval": s.refresh,
                    "secretStoreRef": {"name": s.store, "kind": "ClusterSecretStore"},
                    "target": {
                        "name": target,
                        "creationPolicy": "Owner",
                        "deletionPolicy": "Retain",
                        **_secret_template(target, values),
                    },
                    "data": data,
                },
            }
        )
    if values.mtls.provider == "cert-manager":
        out.append(
            {
                "apiVersion": "cert-manager.io/v1",
                "kind": "Issuer",
                "metadata": object_meta(CA_KEYS, namespace, values),
                "spec": {"ca": {"secretName": CA_KEYS}},
            }
        )
    return out


def _secret_template(target: str, values: Values) -> Obj:
    if target == CA_KEYS:
        return {"template": {"type": "kubernetes.io/tls"}}
    if target == DATABASE_KEYS and values.database.mode == "cloudnativepg":
        # CloudNativePG's initdb reads the app role's credentials from a
        # basic-auth Secret; the user name is not secret, the password a key.
        return {
            "template": {
                "type": "kubernetes.io/basic-auth",
                "data": {"username": "app", "password": "{{ .password }}"},
            }
        }
    return {}


def database_cluster(values: Values) -> list[Obj]:
    db = values.database
    if db.mode != "cloudnativepg":
        return []
    return [
        {
            "apiVersion": "postgresql.cnpg.io/v1",
            "kind": "Cluster",
            "metadata": object_meta(DB_CLUSTER, environment_namespace(values), values),
            "spec": {
                "instances": db.instances,
                "imageName": db.image,
                "storage": {"size": db.storage},
                # The app role's password: the same secret-store key every pod reads.
                "bootstrap": {
                    "initdb": {
                        "database": "app",
                        "owner": "app",
                        "secret": {"name": DATABASE_KEYS},
                    }
                },
                "postgresql": {"parameters": {"password_encryption": "scram-sha-256"}},
                "resources": {
                    "requests": {"cpu": "500m", "memory": "1Gi"},
                    "limits": {"cpu": "2", "memory": "2Gi"},
                },
                "monitoring": {"enablePodMonitor": False},
            },
        }
    ]
