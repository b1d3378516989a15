"""server: the BentoML service (inference per task, task submission and status, lineage,
hot swap, cross-task batching, Prometheus metrics, auth, the web page)."""
