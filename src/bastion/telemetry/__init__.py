"""Telemetry, on the ground floor: OpenTelemetry traces and Prometheus metrics."""
