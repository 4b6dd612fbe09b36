"""The incident runbook: controls an operator (or a detector) flips during an incident."""
