"""``bastion deploy render`` and ``bastion check manifests``, offline (no cluster).

Rendering with several value sets gives objects that all validate against the
Kubernetes and CRD schemas and pass Bastion's own manifest check; the
NetworkPolicies give exactly the intended flow table; every manifest lint
fires on a planted bad manifest; the SARIF is valid; a literal secret in the
values is refused without being echoed.

Risky values are assembled at run time, so this file stays clean for
``bastion check repo``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from bastion.check.manifests import RULES, check_manifests
from bastion.cli import app
from bastion.deploy.netpol import External, Flow, NetworkPolicies, Pod, Port, workload_pods
from bastion.deploy.render import file_name, render
from bastion.deploy.values import ValuesError, parse_values
from bastion.settings import Settings

SARIF_SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-2.1.0.json").read_text())
DIGEST = "sha256:" + "ab12" * 16
BASE: dict[str, Any] = {
    "environment": "prod",
    "image": {"repository": "ghcr.io/bastion-org/bastion", "digest": DIGEST},
    "database": {
        "url": "postgresql://bastion@db.example:5432/bastion",
        "cidr": "10.20.0.0/24",
        "password_key": "bastion/prod/database-password",
    },
    "public": {
        "api_url": "https://api.bastion.example.com",
        "gateway_url": "https://gateway.bastion.example.com",
    },
    "providers": [{"name": "openai", "cidr": "162.159.140.0/24"}],
}


def values_set(name: str) -> dict[str, Any]:
    v = copy.deepcopy(BASE)
    if name == "isolated":
        v["providers"].append({"name": "local", "cidr": "10.30.0.0/16", "ports": [8443]})
        v["isolated_tenants"] = ["acme", "globex"]
    elif name == "cnpg-spire":
        v["environment"] = "staging"
        v["image"] = {"repository": "ghcr.io/bastion-org/bastion", "tag": "0.1.0"}
        v["database"] = {
            "mode": "cloudnativepg",
            "password_key": "bastion/staging/app-password",
            "api_server_cidr": "10.0.0.1/32",
        }
        v["mtls"] = {
            "provider": "spire",
            "trust_domain": "example.org",
            "spiffe_helper": {"repository": "ghcr.io/spiffe/spiffe-helper", "digest": DIGEST},
        }
        v["isolated_tenants"] = ["acme"]
    elif name == "csi":
        v["secrets"] = {"driver": "csi", "store": "vault"}
    return v


SETS = ["small", "isolated", "cnpg-spire", "csi"]


def render_set(name: str) -> list[dict[str, Any]]:
    return render(parse_values(values_set(name)))


# -- rendering validates ----------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_rendered_objects_validate_and_pass_check_manifests(name: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(values_set(name)))
    out = tmp_path / "manifests"
    result = CliRunner().invoke(
        app, ["deploy", "render", "--values", str(values), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    objects = render_set(name)
    written = {
        p.relative_to(out).as_posix(): yaml.safe_load(p.read_text()) for p in out.rglob("*.yaml")
    }
    assert written == {file_name(o): o for o in objects}  # one file per object, as rendered

    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "NetworkPolicy",
        "Deployment",
        "Rollout",
        "AnalysisTemplate",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ResourceQuota",
        "LimitRange",
        "ServiceAccount",
        "Service",
    } <= kinds
    assert "Secret" not in kinds  # references only
    assert ("ClusterSPIFFEID" in kinds) == (name == "cnpg-spire")
    svid_certificates = [o for o in objects if o["kind"] == "Certificate" and "uris" in o["spec"]]
    assert bool(svid_certificates) == (name != "cnpg-spire")
    assert ("Cluster" in kinds) == (name == "cnpg-spire")
    assert ("SecretProviderClass" in kinds) == (name == "csi")

    # Every object validates against its Kubernetes or CRD schema (else
    # schema-invalid or schema-unknown) and passes every lint; a tag instead of
    # a digest is a note.
    findings = check_manifests(out)
    expected = {"image-tag-not-digest"} if name == "cnpg-spire" else set()
    assert {f.rule.id for f in findings} == expected, [(f.rule.id, f.message) for f in findings]

    # Workload certificates carry exactly the SPIFFE IDs the processes check.
    trust = values_set(name).get("mtls", {}).get("trust_domain", "bastion.internal")
    ids = {u for o in svid_certificates for u in o["spec"]["uris"]} | {
        o["spec"]["spiffeIDTemplate"] for o in objects if o["kind"] == "ClusterSPIFFEID"
    }
    assert ids == {f"spiffe://{trust}/bastion/{w}" for w in ("api", "gateway", "worker", "scraper")}

    # Every variable the pods get is one the settings read (no silent typo).
    fields = {f"BASTION_{f.upper()}" for f in Settings.model_fields} | {"DATABASE_URL"}
    for o in objects:
        if o["kind"] in ("Deployment", "Rollout"):
            env = o["spec"]["template"]["spec"]["containers"][0]["env"]
            assert {e["name"] for e in env} <= fields
            # The public listeners serve HTTPS from a mounted, renewed certificate;
            # with cert-manager, the SVID comes from files (no CA key in the pod).
            pod = o["spec"]["template"]["spec"]
            process = o["spec"]["template"]["metadata"]["labels"]["bastion.dev/workload"]
            by_name = {e["name"]: e["value"] for e in env}
            public = process in ("api", "gateway")
            assert ("BASTION_PUBLIC_TLS_CERT_FILE" in by_name) == public
            assert by_name["BASTION_WORKLOAD_SVID_DIR"] == "/run/svid"  # cert-manager or SPIRE
            svid = next(v for v in pod["volumes"] if v["name"] == "svid")
            if name != "cnpg-spire":
                assert {i["path"] for i in svid["secret"]["items"]} == {
                    "svid.pem",
                    "svid.key",
                    "bundle.pem",
                }
            probe = pod["containers"][0]["readinessProbe"]["httpGet"]
            assert probe["scheme"] == ("HTTPS" if public else "HTTP")
    https = {o["metadata"]["name"] for o in objects if o["kind"] == "Certificate"} - {
        o["metadata"]["name"] for o in svid_certificates
    }
    assert {"bastion-api-https", "bastion-gateway-https"} <= https

    # The gateway canary: 5% first, then Prometheus analysis (error ratio and latency).
    rollout = next(o for o in objects if o["kind"] == "Rollout")
    steps = rollout["spec"]["strategy"]["canary"]["steps"]
    assert steps[0] == {"setWeight": 5}
    assert steps[-1]["analysis"]["templates"] == [{"templateName": "bastion-gateway-health"}]
    analysis = next(o for o in objects if o["kind"] == "AnalysisTemplate")
    assert {m["name"] for m in analysis["spec"]["metrics"]} == {"error-ratio", "p95-latency-ms"}


def _pods(objects: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(namespace, workload, pod spec) of every Deployment and Rollout."""
    return [
        (
            o["metadata"]["namespace"],
            o["spec"]["template"]["metadata"]["labels"]["bastion.dev/workload"],
            o["spec"]["template"]["spec"],
        )
        for o in objects
        if o["kind"] in ("Deployment", "Rollout")
    ]


@pytest.mark.parametrize("name", SETS)
def test_api_calls_the_gateway_at_its_internal_service_name(name: str) -> None:
    """api_host is the pod's bind address (0.0.0.0): the api is pointed at the
    gateway's Service by name, on the port that Service gives its internal
    listener, and the settings built from the pod's env call exactly that."""
    objects = render_set(name)
    env_ns = f"bastion-{values_set(name)['environment']}"
    (api,) = [pod for ns, w, pod in _pods(objects) if w == "api"]
    env = {e["name"]: e["value"] for e in api["containers"][0]["env"]}
    assert env["BASTION_API_HOST"] == "0.0.0.0"  # noqa: S104 - the bind address
    assert env["BASTION_GATEWAY_INTERNAL_HOST"] == f"bastion-gateway.{env_ns}.svc"
    service = next(
        o
        for o in objects
        if o["kind"] == "Service"
        and o["metadata"] == o["metadata"] | {"name": "bastion-gateway", "namespace": env_ns}
    )
    internal = next(p for p in service["spec"]["ports"] if p["name"] == "internal")
    assert str(internal["port"]) == env["BASTION_GATEWAY_INTERNAL_PORT"]
    settings = Settings(
        api_host=env["BASTION_API_HOST"],
        issuer=env["BASTION_ISSUER"],
        gateway_public_url=env["BASTION_GATEWAY_PUBLIC_URL"],
        gateway_internal_host=env["BASTION_GATEWAY_INTERNAL_HOST"],
        gateway_internal_port=int(env["BASTION_GATEWAY_INTERNAL_PORT"]),
    )
    assert settings.gateway_internal_url == f"https://bastion-gateway.{env_ns}.svc:8703"
    # Only the api calls the gateway; no other pod is given the setting.
    for _ns, workload, pod in _pods(objects):
        names = {e["name"] for e in pod["containers"][0]["env"]}
        assert ("BASTION_GATEWAY_INTERNAL_HOST" in names) == (workload == "api")


def test_spire_pods_run_spiffe_helper_writing_the_files_bastion_reads() -> None:
    """With SPIRE, each pod's spiffe-helper (a native sidecar, started and
    ready before Bastion) writes svid.pem, svid.key and bundle.pem from the
    agent's socket into a memory volume that Bastion reads, read-only, as
    BASTION_WORKLOAD_SVID_DIR; its configuration names the same paths. The
    whole set validates and passes the flow table in the parametrised tests."""
    objects = render_set("cnpg-spire")
    maps = {
        o["metadata"]["namespace"]: o["data"]["helper.conf"]
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bastion-spiffe-helper"
    }
    pods = _pods(objects)
    assert {ns for ns, _w, _p in pods} == set(maps)  # one config per namespace with pods
    for namespace, _workload, pod in pods:
        conf = dict(
            (k.strip(), v.strip().strip('"'))
            for k, _sep, v in (line.partition("=") for line in maps[namespace].splitlines())
            if _sep
        )
        (helper,) = pod["initContainers"]
        bastion = pod["containers"][0]
        env = {e["name"]: e["value"] for e in bastion["env"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        helper_mounts = {m["name"]: m for m in helper["volumeMounts"]}
        bastion_mounts = {m["name"]: m for m in bastion["volumeMounts"]}

        assert helper["restartPolicy"] == "Always"  # a sidecar: keeps renewing
        assert helper["image"] == f"ghcr.io/spiffe/spiffe-helper@{DIGEST}"
        assert helper["args"] == [
            "-config",
            f"{helper_mounts['spiffe-helper']['mountPath']}/helper.conf",
        ]
        # Bastion starts once the files are written: the startup probe is /ready.
        assert helper["startupProbe"]["httpGet"] == {
            "path": conf["readiness_path"],
            "port": int(conf["bind_port"]),
        }
        assert conf["daemon_mode"] == "true" and conf["listener_enabled"] == "true"
        assert (
            conf["svid_file_name"],
            conf["svid_key_file_name"],
            conf["svid_bundle_file_name"],
        ) == (
            "svid.pem",
            "svid.key",
            "bundle.pem",
        )
        # One directory: written by the helper, read (only) by Bastion, in memory.
        assert volumes["svid"] == {
            "name": "svid",
            "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
        }
        assert (
            conf["cert_dir"]
            == helper_mounts["svid"]["mountPath"]
            == env["BASTION_WORKLOAD_SVID_DIR"]
        )
        assert not helper_mounts["svid"].get("readOnly")
        assert bastion_mounts["svid"]["mountPath"] == env["BASTION_WORKLOAD_SVID_DIR"]
        assert bastion_mounts["svid"]["readOnly"] is True
        # The agent's socket, from the SPIFFE CSI driver, for the helper alone.
        socket = volumes["spiffe-workload-api"]
        assert socket["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
        assert conf["agent_address"].startswith(
            helper_mounts["spiffe-workload-api"]["mountPath"] + "/"
        )
        assert "spiffe-workload-api" not in bastion_mounts
    # SPIRE without the helper's image is refused (nothing would write the files).
    values = values_set("cnpg-spire")
    del values["mtls"]["spiffe_helper"]
    with pytest.raises(ValuesError, match="spiffe_helper"):
        parse_values(values)


# -- the flow table ---------------------------------------------------------------

# The internal (mTLS) listeners, which also serve /metrics to the scraper.
INTERNAL = {"api": 8704, "gateway": 8703, "worker": 8705}
PEERS = [
    Pod(
        "ingress-nginx",
        "controller",
        {"app.kubernetes.io/name": "ingress-nginx"},
        {"kubernetes.io/metadata.name": "ingress-nginx"},
        (Port(443),),
    ),
    Pod(
        "monitoring",
        "prometheus",
        {"app.kubernetes.io/name": "prometheus"},
        {"kubernetes.io/metadata.name": "monitoring"},
        (Port(9090),),
    ),
    Pod(
        "kube-system",
        "coredns",
        {"k8s-app": "kube-dns"},
        {"kubernetes.io/metadata.name": "kube-system"},
        (Port(53, "UDP"), Port(53)),
    ),
    Pod(
        "cnpg-system",
        "operator",
        {"app.kubernetes.io/name": "cloudnative-pg"},
        {"kubernetes.io/metadata.name": "cnpg-system"},
        (Port(9443),),
    ),
    # Someone else's pod in Bastion's namespace's neighbourhood: reaches nothing.
    Pod("default", "stranger", {"app": "x"}, {"kubernetes.io/metadata.name": "default"}, ()),
]
EXTERNALS = [
    External("openai", "162.159.140.7"),
    External("local", "10.30.1.2", (Port(8443), Port(443))),
    External("database", "10.20.0.5", (Port(5432),)),
    External("apiserver", "10.0.0.1", (Port(443),)),
    External("internet", "198.51.100.7", (Port(443), Port(80))),
]


def intended(name: str) -> set[Flow]:
    """The flow table as designed (docs/deploy.md), written out rule by rule."""
    v = values_set(name)
    env = f"bastion-{v['environment']}"
    tenants = [f"{env}-t-{t}" for t in v.get("isolated_tenants", [])]
    cnpg = v["database"].get("mode") == "cloudnativepg"
    ours = [f"{env}/{w}" for w in ("api", "gateway", "worker")]
    ours += [f"{ns}/{w}" for ns in tenants for w in ("gateway", "worker")]
    gateways = [f"{ns}/gateway" for ns in [env, *tenants]]
    flows = {Flow("ingress-nginx/controller", f"{env}/api", "TCP", 8700)}
    for pod in ours:
        flows.add(Flow("monitoring/prometheus", pod, "TCP", INTERNAL[pod.split("/")[1]]))
        flows |= {Flow(pod, "kube-system/coredns", p, 53) for p in ("UDP", "TCP")}
        if cnpg:
            flows.add(Flow(pod, f"{env}/postgres", "TCP", 5432))
        else:
            flows.add(Flow(pod, "external/database", "TCP", 5432))
    for gateway in gateways:
        flows |= {Flow(f"{env}/api", gateway, "TCP", p) for p in (8701, INTERNAL["gateway"])}
        flows.add(Flow(gateway, "external/openai", "TCP", 443))
        if name == "isolated":
            flows.add(Flow(gateway, "external/local", "TCP", 8443))
    if cnpg:
        pg = f"{env}/postgres"
        flows |= {
            Flow("cnpg-system/operator", pg, "TCP", 8000),
            Flow("monitoring/prometheus", pg, "TCP", 9187),
            Flow(pg, "external/apiserver", "TCP", 443),
            Flow(pg, "kube-system/coredns", "UDP", 53),
            Flow(pg, "kube-system/coredns", "TCP", 53),
        }
    return flows


@pytest.mark.parametrize("name", SETS)
def test_network_policy_flow_table_is_exactly_the_intended_one(name: str) -> None:
    objects = render_set(name)
    ours = workload_pods(objects)
    namespaces = {p.namespace for p in ours}
    flows = NetworkPolicies.of(objects).flows([*ours, *PEERS], EXTERNALS)
    # Flows between pods outside Bastion's namespaces are not ours to govern.
    touching = {
        f
        for f in flows
        if f.source.split("/")[0] in namespaces or f.destination.split("/")[0] in namespaces
    }
    assert touching == intended(name)


def test_network_policy_evaluator_follows_kubernetes_semantics() -> None:
    ns = {"kubernetes.io/metadata.name": "a"}
    web = Pod("a", "web", {"app": "web"}, ns, (Port(80, name="http"), Port(9000)))
    db = Pod("a", "db", {"app": "db"}, ns, (Port(5432),))
    other = Pod("b", "web", {"app": "web"}, {"kubernetes.io/metadata.name": "b"}, (Port(80),))
    cidr = External("blocked", "10.1.2.3", (Port(443),))
    fine = External("fine", "10.1.9.9", (Port(443),))

    def np(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        meta = {"name": name, "namespace": "a"}
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta,
            "spec": spec,
        }

    # Nothing selects a pod: everything is open.
    assert NetworkPolicies([]).allows(other, web, Port(80, name="http"))
    # No policyTypes and ingress rules only: ingress-isolated, egress open.
    policies = NetworkPolicies(
        [
            np(
                "web-from-db",
                {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": "http"}]}],
                },
            ),
            np(
                "db-egress",
                {
                    "podSelector": {
                        "matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]
                    },
                    "egress": [
                        {"to": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}}]},
                        {
                            "to": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                            "ports": [{"port": 8000, "endPort": 9000}],
                        },
                    ],
                },
            ),
        ]
    )
    cache = Pod("a", "cache", {"app": "cache"}, ns, ())
    assert policies.allows(cache, web, Port(80, name="http"))  # named port, same namespace
    assert not policies.allows(other, web, Port(80, name="http"))  # podSelector: own namespace
    assert not policies.allows(cache, web, Port(9000))  # ingress: only the named port
    assert not policies.allows(db, web, Port(9000))  # db may send it, web does not take it
    assert policies.allows(web, other, Port(80))  # web is not egress-isolated
    assert policies.allows(db, fine, Port(443))  # ipBlock
    assert not policies.allows(db, cidr, Port(443))  # ... minus except
    assert not policies.allows(db, other, Port(80))  # db is egress-isolated
    # No policyTypes: Ingress is implied, so db is ingress-isolated with no ingress rule.
    assert not policies.allows(other, db, Port(5432))


# -- the lints fire on planted bad manifests ---------------------------------------


def _planted(tmp_path: Path) -> tuple[Path, set[tuple[str, str]]]:
    """One bad object per lint, each a copy of Bastion's api Deployment with one
    thing changed (or a crafted object), beside Bastion's own default-deny; the
    expected findings."""
    objects = render_set("small")
    root = tmp_path / "bad"
    root.mkdir()
    deny = next(o for o in objects if o["metadata"]["name"] == "default-deny")
    (root / "default-deny.yaml").write_text(yaml.safe_dump(deny))
    api = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "bastion-api"
    )

    def variant(name: str, change: Any, namespace: str = "bastion-prod") -> dict[str, Any]:
        obj = copy.deepcopy(api)
        obj["metadata"]["name"] = name
        obj["metadata"]["namespace"] = namespace
        pod = obj["spec"]["template"]["spec"]
        change(pod, pod["containers"][0], pod["containers"][0]["securityContext"])
        return obj

    password = "hunter2" + "-correct-horse"
    token = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
    bad = [
        variant(
            "root",
            lambda p, c, s: (s.pop("runAsNonRoot"), p["securityContext"].pop("runAsNonRoot")),
        ),
        variant("escalate", lambda p, c, s: s.update(allowPrivilegeEscalation=True)),
        variant("writable", lambda p, c, s: s.update(readOnlyRootFilesystem=False)),
        variant(
            "caps", lambda p, c, s: s.update(capabilities={"drop": ["ALL"], "add": ["NET_ADMIN"]})
        ),
        variant(
            "seccomp",
            lambda p, c, s: (s.pop("seccompProfile"), p["securityContext"].pop("seccompProfile")),
        ),
        variant(
            "hostpath",
            lambda p, c, s: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        ),
        variant("hostnet", lambda p, c, s: p.update(hostNetwork=True)),
        variant("privileged", lambda p, c, s: s.update(privileged=True)),
        variant("limits", lambda p, c, s: c["resources"].pop("limits")),
        variant("probes", lambda p, c, s: c.pop("readinessProbe")),
        variant("latest", lambda p, c, s: c.update(image="ghcr.io/bastion-org/bastion:latest")),
        variant("tagged", lambda p, c, s: c.update(image="ghcr.io/bastion-org/bastion:0.1.0")),
        variant("token", lambda p, c, s: p.update(automountServiceAccountToken=True)),
        variant(
            "envsecret", lambda p, c, s: c["env"].append({"name": "STRIPE_KEY", "value": token})
        ),
        variant("typo", lambda p, c, s: c.update(imagePullPolicyy="Always")),
        variant("nodeny", lambda p, c, s: None, namespace="elsewhere"),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds", "namespace": "bastion-prod"},
            "stringData": {"password": password},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "conf", "namespace": "bastion-prod"},
            "data": {"DATABASE_URL": f"postgresql://app:{password}@db/app"},
        },
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": {"name": "c", "namespace": "bastion-prod"},
            "spec": {"secretName": "x", "uris": "spiffe://x"},
        },
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w", "namespace": "bastion-prod"},
        },
    ]
    (root / "bad.yaml").write_text(yaml.safe_dump_all(bad))
    (root / "broken.yaml").write_text("kind: [unclosed\n")
    d = "Deployment/bastion-prod/"
    expected = {
        ("run-as-root", d + "root"),
        ("privilege-escalation", d + "escalate"),
        ("writable-root-filesystem", d + "writable"),
        ("capabilities-not-dropped", d + "caps"),
        ("seccomp-unconfined", d + "seccomp"),
        ("host-access", d + "hostpath"),
        ("host-access", d + "hostnet"),
        ("host-access", d + "privileged"),
        ("resources-missing", d + "limits"),
        ("probes-missing", d + "probes"),
        ("image-unpinned", d + "latest"),
        ("image-tag-not-digest", d + "tagged"),
        ("service-account-token", d + "token"),
        ("literal-secret", d + "envsecret"),
        ("schema-invalid", d + "typo"),
        ("default-deny-missing", "Namespace/elsewhere"),
        ("literal-secret", "Secret/bastion-prod/creds"),
        ("literal-secret", "ConfigMap/bastion-prod/conf"),
        ("schema-invalid", "Certificate/bastion-prod/c"),
        ("schema-unknown", "Widget/bastion-prod/w"),
        ("unparseable", "broken.yaml"),
    }
    return root, expected


def test_each_manifest_lint_fires_on_a_planted_bad_manifest(tmp_path: Path) -> None:
    root, expected = _planted(tmp_path)
    found = {(f.rule.id, f.subject) for f in check_manifests(root)}
    assert found == expected
    assert {rule for rule, _ in expected} == set(RULES)  # every lint is exercised


def test_check_manifests_sarif_is_valid_and_fails_the_build(tmp_path: Path) -> None:
    root, expected = _planted(tmp_path)
    out = tmp_path / "manifests.sarif"
    result = CliRunner().invoke(
        app, ["check", "manifests", str(root), "--format", "sarif", "--out", str(out)]
    )
    assert result.exit_code == 1, result.output
    sarif = json.loads(out.read_text())
    jsonschema.validate(sarif, SARIF_SCHEMA)
    results = sarif["runs"][0]["results"]
    assert len(results) == len(check_manifests(root)) >= len(expected)
    assert {r["ruleId"] for r in results} == set(RULES)
    # Secret values are never copied into the report.
    assert "hunter2" not in out.read_text() and "sk_live_" not in out.read_text()


@pytest.mark.parametrize("name", SETS)
def test_pods_carry_the_public_urls_and_their_settings_resolve_them(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pod binds 0.0.0.0, so none may derive its issuer or the gateway's
    public URL from that: each one (tenants' too) is given the values' URLs,
    and the settings built from exactly its environment resolve to them (and
    start: bastion.settings refuses the wildcard without them). The public
    listeners' certificates also name their URL's host."""
    public = values_set(name)["public"]
    objects = render_set(name)
    pods = _pods(objects)
    assert {w for _ns, w, _pod in pods} == {"api", "gateway", "worker"}
    for _ns, _workload, pod in pods:
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["BASTION_ISSUER"] == public["api_url"]
        assert env["BASTION_GATEWAY_PUBLIC_URL"] == public["gateway_url"]
        with monkeypatch.context() as patched:
            for variable in [v for v in os.environ if v.startswith("BASTION_")]:
                patched.delenv(variable)
            for variable, value in env.items():
                patched.setenv(variable, value)
            settings = Settings()
        assert settings.api_host == "0.0.0.0"  # noqa: S104 - the bind address
        assert settings.resolved_issuer == public["api_url"]
        assert settings.gateway_url == public["gateway_url"]
    certificates = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Certificate"}
    for process, host in (
        ("api", "api.bastion.example.com"),
        ("gateway", "gateway.bastion.example.com"),
    ):
        assert host in certificates[f"bastion-{process}-https"]["spec"]["dnsNames"]


# -- bad values are refused ----------------------------------------------------------


def _render_cli(tmp_path: Path, values: dict[str, Any], *flags: str) -> tuple[int, str, Path]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["deploy", "render", "--values", str(path), "--out", str(out), *flags]
    )
    return result.exit_code, result.output, out


@pytest.mark.parametrize(
    ("where", "plant"),
    [
        ("database.password_key", lambda v, s: v["database"].update(password_key=s)),
        (
            "database.url",
            lambda v, s: v["database"].update(url=f"postgresql://bastion:{s}@db/bastion"),
        ),
        ("secrets.master_key", lambda v, s: v.setdefault("secrets", {}).update(master_key=s)),
        ("providers[0].api_key", lambda v, s: v["providers"][0].update(api_key=s)),
    ],
)
def test_literal_secret_in_values_is_refused(tmp_path: Path, where: str, plant: Any) -> None:
    secret = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
    values = values_set("small")
    plant(values, secret)
    code, output, out = _render_cli(tmp_path, values)
    assert code == 2
    assert f"{where}: looks like a literal secret" in output
    assert secret not in output and "4eC39Hq" not in output
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: v.update(environment="Prod!"), "environment: String should match pattern"),
        (
            lambda v: v["image"].pop("digest"),
            "image: Value error, give exactly one of digest or tag",
        ),
        (
            lambda v: v.update(image={"repository": "r", "tag": "latest"}),
            "'latest' is not a version",
        ),
        (lambda v: v.update(api={"min_replicas": 5, "max_replicas": 2}), "min_replicas is above"),
        (lambda v: v["providers"][0].update(cidr="0.0.0.0/0"), "may not be the whole internet"),
        (lambda v: v.update(quota={"cpu": "2"}), "quota.cpu: too small for bastion-prod"),
        (lambda v: v.update(databse={}), "databse: Extra inputs are not permitted"),
        # The public URLs: required, https, a base URL only.
        (lambda v: v.pop("public"), "public: Field required"),
        (lambda v: v["public"].pop("gateway_url"), "public.gateway_url: Field required"),
        (
            lambda v: v["public"].update(api_url="http://api.bastion.example.com"),
            "public.api_url: Value error, an https URL with a host",
        ),
        (
            lambda v: v["public"].update(gateway_url="https://ops@gateway.example.com"),
            "public.gateway_url: Value error, no userinfo, query or fragment",
        ),
        (
            lambda v: v["public"].update(api_url="https://api.example.com/?next=x"),
            "public.api_url: Value error, no userinfo, query or fragment",
        ),
        (
            lambda v: v["public"].update(api_url="https://0.0.0.0:8700"),
            "public.api_url: Value error, a host clients can reach",
        ),
    ],
)
def test_bad_values_are_refused_with_a_clear_error(
    tmp_path: Path, change: Any, message: str
) -> None:
    values = values_set("small")
    change(values)
    code, output, out = _render_cli(tmp_path, values)
    assert code == 2 and message in output, output
    assert not out.exists()


def test_parse_values_names_every_problem() -> None:
    with pytest.raises(ValuesError) as caught:
        parse_values({"environment": "x"})
    assert {where for where, _ in caught.value.problems} == {"image", "database", "public"}


def test_render_replaces_only_its_own_output(tmp_path: Path) -> None:
    values = values_set("small")
    code, output, out = _render_cli(tmp_path, values)
    assert code == 0, output
    (out / "stale.yaml").write_text("kind: Leftover\n")
    code, output, out = _render_cli(tmp_path, values)
    assert code == 0 and not (out / "stale.yaml").exists()  # a re-render leaves nothing stale
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    path = tmp_path / "values.yaml"
    result = CliRunner().invoke(
        app, ["deploy", "render", "--values", str(path), "--out", str(foreign)]
    )
    assert result.exit_code == 2 and "was not written by bastion deploy" in result.output
    assert (foreign / "keep.txt").read_text() == "mine"


# -- the Kustomize base and overlay -----------------------------------------------

# The Kustomization fields `deploy render --kustomize` writes, checked by hand
# against SchemaStore's kustomization.json (definitions Kustomization, Image,
# Replicas, PatchesInlinePatch, PatchTargetOptional): the same types, with
# additionalProperties false, restricted to the fields used.
_STRINGS = {"type": "string"}
KUSTOMIZATION_SUBSET: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "resources": {"type": "array", "items": _STRINGS, "minItems": 1},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {k: _STRINGS for k in ("name", "newName", "newTag", "digest")},
            },
        },
        "replicas": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "count"],
                "properties": {"name": _STRINGS, "count": {"type": "integer"}},
            },
        },
        "patches": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["patch", "target"],
                "properties": {
                    "patch": _STRINGS,
                    "target": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            k: _STRINGS for k in ("group", "version", "kind", "name", "namespace")
                        },
                    },
                },
            },
        },
    },
}


def _image_name(image: str) -> str:
    image = image.split("@", 1)[0]
    head, _, tail = image.rpartition(":")
    return head if head and "/" not in tail else image


def expand(folder: Path) -> list[dict[str, Any]]:
    """A small `kustomize build` for the fields `deploy render --kustomize` uses:
    resources (files and folders), images, replicas and RFC 6902 `replace`
    patches. Anything else fails, and every entry must match some object."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    jsonschema.validate(kustomization, KUSTOMIZATION_SUBSET)
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            objects += expand(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    workloads = [o for o in objects if pod_spec_of(o) is not None]
    for image in kustomization.get("images", []):
        pin = f"@{image['digest']}" if "digest" in image else f":{image['newTag']}"
        hits = [
            c
            for o in workloads
            for c in pod_spec_of(o)["containers"] + pod_spec_of(o).get("initContainers", [])
            if _image_name(c["image"]) == image["name"]
        ]
        assert hits, image
        for container in hits:
            container["image"] = image.get("newName", image["name"]) + pin
    for replicas in kustomization.get("replicas", []):
        hits = [
            o
            for o in objects
            if o["kind"] in ("Deployment", "ReplicaSet", "StatefulSet", "ReplicationController")
            and o["metadata"]["name"] == replicas["name"]
        ]
        assert hits, replicas
        for o in hits:
            o["spec"]["replicas"] = replicas["count"]
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        hits = [
            o
            for o in objects
            if o["apiVersion"] == f"{target['group']}/{target['version']}"
            and all(
                o["kind"] == target["kind"] if k == "kind" else o["metadata"].get(k) == target[k]
                for k in ("kind", "name", "namespace")
                if k in target
            )
        ]
        assert hits, target
        for operation in yaml.safe_load(patch["patch"]):
            assert operation["op"] == "replace", operation  # the only op used
            *parents, leaf = operation["path"].strip("/").split("/")
            for o in hits:
                node = o
                for part in parents:
                    node = node[part]
                assert leaf in node, operation["path"]  # replace needs an existing member
                node[leaf] = operation["value"]
    return objects


def pod_spec_of(obj: dict[str, Any]) -> Any:
    if obj["kind"] in ("Deployment", "Rollout"):
        return obj["spec"]["template"]["spec"]
    return None


def _identity(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


@pytest.mark.parametrize("name", ["isolated", "cnpg-spire"])
def test_kustomize_overlay_builds_exactly_the_rendered_objects(name: str, tmp_path: Path) -> None:
    values = values_set(name)
    code, output, out = _render_cli(tmp_path, values, "--kustomize")
    assert code == 0, output
    objects = render_set(name)
    environment = values["environment"]

    # The base is the plain rendering, file for file, plus its kustomization.
    base = {
        p.relative_to(out / "base").as_posix(): yaml.safe_load(p.read_text())
        for p in (out / "base").rglob("*.yaml")
        if p.name != "kustomization.yaml"
    }
    assert base == {file_name(o): o for o in objects}
    listed = yaml.safe_load((out / "base" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(base)  # every object, once
    assert {p.relative_to(out).as_posix() for p in out.rglob("kustomization.yaml")} == {
        "base/kustomization.yaml",
        f"overlays/{environment}/kustomization.yaml",
    }

    # base + overlay expands to exactly render's objects (the overlay pins the
    # image and the replicas of every workload, tenants' included) ...
    expanded = expand(out / "overlays" / environment)
    assert len(expanded) == len(objects)
    assert {_identity(o): o for o in expanded} == {_identity(o): o for o in objects}

    # ... which validate and pass every lint; the kustomization files are
    # skipped by `check manifests` as build instructions, not objects.
    built = tmp_path / "built"
    built.mkdir()
    (built / "all.yaml").write_text(yaml.safe_dump_all(expanded))
    expected = {"image-tag-not-digest"} if name == "cnpg-spire" else set()
    assert {f.rule.id for f in check_manifests(built)} == expected
    assert {f.rule.id for f in check_manifests(out)} == expected


def test_kustomize_overlay_alone_sets_image_and_replicas_everywhere(tmp_path: Path) -> None:
    code, output, out = _render_cli(tmp_path, values_set("isolated"), "--kustomize")
    assert code == 0, output
    overlay = out / "overlays" / "prod" / "kustomization.yaml"
    kustomization = yaml.safe_load(overlay.read_text())
    new_digest = "sha256:" + "cd34" * 16
    kustomization["images"][0]["digest"] = new_digest  # what `kustomize edit set image` does
    for replicas in kustomization["replicas"]:
        replicas["count"] += 3
    for patch in kustomization["patches"]:
        patch["patch"] = patch["patch"].replace("value: 2", "value: 7")
    overlay.write_text(yaml.safe_dump(kustomization))

    expanded = expand(out / "overlays" / "prod")
    rendered = {_identity(o): o for o in render_set("isolated")}
    pods = [o for o in expanded if pod_spec_of(o) is not None]
    assert {o["metadata"]["namespace"] for o in pods} == {
        "bastion-prod",
        "bastion-prod-t-acme",
        "bastion-prod-t-globex",
    }
    for o in pods:
        before = rendered[_identity(o)]
        images = {c["image"] for c in pod_spec_of(o)["containers"]}
        assert images == {f"ghcr.io/bastion-org/bastion@{new_digest}"}, o["metadata"]
        want = 7 if o["kind"] == "Rollout" else before["spec"]["replicas"] + 3
        assert o["spec"]["replicas"] == want, o["metadata"]
    # Nothing but the image and the replicas moved.
    for o in expanded:
        before = copy.deepcopy(rendered[_identity(o)])
        if pod_spec_of(o) is not None:
            before["spec"]["replicas"] = o["spec"]["replicas"]
            for c in pod_spec_of(before)["containers"]:
                c["image"] = f"ghcr.io/bastion-org/bastion@{new_digest}"
        assert o == before
