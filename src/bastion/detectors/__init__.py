"""Live detectors: rules over the audit trail as it commits, and their automatic response."""
