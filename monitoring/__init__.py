"""Prometheus metrics and exporter; Grafana dashboard and alert rules as files.

Imported as ``gateway.monitoring``.
"""
