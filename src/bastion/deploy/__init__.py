"""``bastion deploy``: Kubernetes manifests rendered from a small typed values file.

:mod:`values` is the schema of the values file, :mod:`render` turns values into
plain Kubernetes objects, :mod:`netpol` evaluates the rendered NetworkPolicies
into a flow table. Validation against the Kubernetes and CRD schemas and the
lints live in :mod:`bastion.check.manifests`, so any team's manifests get them.
"""
