"""The camera daemon's dashboard: pages, a JSON API and Prometheus metrics on one HTTP server."""
