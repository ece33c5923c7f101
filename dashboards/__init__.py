"""Grafana dashboards and Prometheus files; ``python -m dashboards.generate`` writes the dashboard JSON."""
