"""What leaves the monitor: Prometheus metrics, the JSON API, the HTTP server and its access control."""
