"""``bastion check``: security audits of a project's database (and, later, repo and manifests)."""
