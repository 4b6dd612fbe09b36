"""The worker process: background jobs, with health served on its own port."""
