"""Model safety: signed prompts and tool calls, PII, injection screening, sandboxing."""
