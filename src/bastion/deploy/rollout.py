"""The gateway's Argo Rollouts canary and its Prometheus AnalysisTemplate."""

from __future__ import annotations

from bastion.deploy.objects import Obj, object_meta
from bastion.deploy.values import Values, Workload


def gateway_rollout(
    namespace: str,
    values: Values,
    w: Workload,
    labels: dict[str, str],
    selector: Obj,
    template: Obj,
) -> list[Obj]:
    """Argo Rollouts canary: ``weight``% -> pause -> Prometheus analysis -> promote.

    A failed analysis aborts the rollout, which scales the canary away and
    leaves the stable version serving (automatic rollback)."""
    c = values.canary
    # bastion.telemetry.metrics' series, of the canary's pods only (the scrape
    # keeps the pod label rollouts-pod-template-hash, e.g. a PodMonitor's
    # podTargetLabels).
    scope = f'namespace="{namespace}",rollouts_pod_template_hash="{{{{args.canary-hash}}}}"'
    metrics = [
        {
            "name": "error-ratio",
            "interval": "1m",
            "count": 5,
            "failureLimit": 1,
            "successCondition": f"len(result) == 0 || result[0] < {c.max_error_ratio}",
            "provider": {
                "prometheus": {
                    "address": c.prometheus_address,
                    "query": (
                        f'sum(rate(bastion_http_requests_total{{{scope},status_class="5xx"}}[2m]))'
                        f" / sum(rate(bastion_http_requests_total{{{scope}}}[2m]))"
                    ),
                }
            },
        },
        {
            "name": "p95-latency-ms",
            "interval": "1m",
            "count": 5,
            "failureLimit": 1,
            "successCondition": f"len(result) == 0 || result[0] < {c.max_p95_latency_ms}",
            "provider": {
                "prometheus": {
                    "address": c.prometheus_address,
                    "query": (
                        "1000 * histogram_quantile(0.95, sum by (le) (rate("
                        f"bastion_http_request_duration_seconds_bucket{{{scope}}}[2m])))"
                    ),
                }
            },
        },
    ]
    analysis = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": object_meta("bastion-gateway-health", namespace, values, **labels),
        "spec": {"args": [{"name": "canary-hash"}], "metrics": metrics},
    }
    rollout = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": object_meta("bastion-gateway", namespace, values, **labels),
        "spec": {
            "replicas": w.min_replicas,
            "revisionHistoryLimit": 5,
            "selector": selector,
            "template": template,
            "strategy": {
                "canary": {
                    "maxSurge": 1,
                    "maxUnavailable": 0,
                    "abortScaleDownDelaySeconds": 0,
                    "steps": [
                        {"setWeight": c.weight},
                        {"pause": {"duration": c.pause}},
                        {
                            "analysis": {
                                "templates": [{"templateName": "bastion-gateway-health"}],
                                "args": [
                                    {
                                        "name": "canary-hash",
                                        "valueFrom": {"podTemplateHashValue": "Latest"},
                                    }
                                ],
                            }
                        },
                    ],
                }
            },
        },
    }
    return [analysis, rollout]
