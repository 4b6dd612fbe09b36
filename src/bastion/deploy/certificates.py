"""X.509-SVIDs (cert-manager Certificates or SPIRE ClusterSPIFFEIDs) with the
SPIFFE IDs :mod:`bastion.identity.workload` checks, and the public HTTPS certificates."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from bastion.deploy.objects import (
    CA_KEYS,
    SPIFFE_HELPER,
    SPIFFE_HELPER_HEALTH_PORT,
    SVID_DIR,
    WORKLOAD_API_SOCKET,
    WORKLOAD_LABEL,
    Obj,
    environment_namespace,
    label_selector,
    object_meta,
)
from bastion.deploy.values import Values
from bastion.identity.workload import SVID_FILES, SVID_LIFETIME, spiffe_id


def svid_objects(name: str, namespace: str, values: Values, labels: dict[str, str]) -> list[Obj]:
    identity = spiffe_id(values.mtls.trust_domain, name)
    if values.mtls.provider == "spire":
        return [
            {
                "apiVersion": "spire.spiffe.io/v1alpha1",
                "kind": "ClusterSPIFFEID",
                "metadata": object_meta(f"{namespace}-{name}", None, values, **labels),
                "spec": {
                    "spiffeIDTemplate": identity,
                    "namespaceSelector": label_selector({"kubernetes.io/metadata.name": namespace}),
                    "podSelector": label_selector({WORKLOAD_LABEL: name}),
                    "ttl": f"{int(SVID_LIFETIME.total_seconds())}s",
                },
            }
        ]
    lifetime = int(SVID_LIFETIME.total_seconds() // 60)
    return [
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": object_meta(f"bastion-{name}-svid", namespace, values, **labels),
            "spec": {
                "secretName": f"bastion-{name}-svid",
                # X.509-SVID section 2: the SPIFFE ID is the one URI SAN; no DNS names.
                "uris": [identity],
                "duration": f"{lifetime}m",
                "renewBefore": f"{lifetime // 3}m",
                "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
                "issuerRef": {
                    "name": CA_KEYS,
                    "kind": "Issuer",
                    "group": "cert-manager.io",
                },
            },
        }
    ]


def https_certificate(name: str, namespace: str, values: Values, labels: dict[str, str]) -> Obj:
    """The public listener's server certificate: the Service's DNS names (and
    the configured public ones), renewed by cert-manager and re-read in place."""
    service = f"bastion-{name}"
    lifetime = 90 * 24
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": object_meta(f"bastion-{name}-https", namespace, values, **labels),
        "spec": {
            "secretName": f"bastion-{name}-https",
            "dnsNames": [
                service,
                f"{service}.{namespace}.svc",
                f"{service}.{namespace}.svc.cluster.local",
                *_public_host(name, values),
                *values.https.dns_names,
            ],
            "duration": f"{lifetime}h",
            "renewBefore": f"{lifetime // 3}h",
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["digital signature", "server auth"],
            "issuerRef": {
                "name": values.https.issuer,
                "kind": values.https.issuer_kind,
                "group": "cert-manager.io",
            },
        },
    }


def _public_host(name: str, values: Values) -> list[str]:
    """The host of the process's public URL (an ingress passing TLS through
    reaches the pod under that name); none for the worker, for an IP address
    (not a DNS name), or for one already listed."""
    url = {"api": values.public.api_url, "gateway": values.public.gateway_url}.get(name)
    host = urlsplit(url).hostname if url else None
    if not host or host in values.https.dns_names:
        return []
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return [host]
    return []


def scraper_svid(values: Values) -> Obj:
    """The metrics scraper's SVID (``.../bastion/scraper``, the one ID /metrics admits).

    SPIRE issues it to the scraper's pods where they run; with cert-manager
    the Certificate is issued here and its Secret is the scraper's client
    certificate (copy or reflect it to the scraper's namespace)."""
    identity = spiffe_id(values.mtls.trust_domain, "scraper")
    if values.mtls.provider == "spire":
        scraper = values.scraper
        return {
            "apiVersion": "spire.spiffe.io/v1alpha1",
            "kind": "ClusterSPIFFEID",
            "metadata": object_meta(f"bastion-{values.environment}-scraper", None, values),
            "spec": {
                "spiffeIDTemplate": identity,
                "namespaceSelector": label_selector(scraper.namespace_labels),
                "podSelector": label_selector(scraper.pod_labels),
                "ttl": f"{int(SVID_LIFETIME.total_seconds())}s",
            },
        }
    lifetime = int(SVID_LIFETIME.total_seconds() // 60)
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": object_meta("bastion-scraper-svid", environment_namespace(values), values),
        "spec": {
            "secretName": "bastion-scraper-svid",
            "uris": [identity],
            "duration": f"{lifetime}m",
            "renewBefore": f"{lifetime // 3}m",
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["digital signature", "client auth"],
            "issuerRef": {"name": CA_KEYS, "kind": "Issuer", "group": "cert-manager.io"},
        },
    }


def spiffe_helper_config(namespace: str, values: Values) -> Obj:
    """spiffe-helper's configuration (HCL) for the pods of ``namespace`` (SPIRE):
    in daemon mode it keeps the three files bastion.identity.workload.SvidFiles
    reads current from the agent's Workload API, and answers /ready once they
    are written (the pod's other containers start after that)."""
    svid, key, bundle = SVID_FILES
    helper_conf = "\n".join(
        [
            f'agent_address = "{WORKLOAD_API_SOCKET}"',
            f'cert_dir = "{SVID_DIR}"',
            f'svid_file_name = "{svid}"',
            f'svid_key_file_name = "{key}"',
            f'svid_bundle_file_name = "{bundle}"',
            "daemon_mode = true",
            "health_checks {",
            "  listener_enabled = true",
            f"  bind_port = {SPIFFE_HELPER_HEALTH_PORT}",
            '  liveness_path = "/live"',
            '  readiness_path = "/ready"',
            "}",
            "",
        ]
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(SPIFFE_HELPER, namespace, values),
        "data": {"helper.conf": helper_conf},
    }
