"""Locust load tests for segserve (REST + gRPC) and their SLO report: ``python -m loadtest.run``."""
