"""The node's HTTP side: health, readiness, Prometheus metrics and status (mailnode.admin.http)."""
