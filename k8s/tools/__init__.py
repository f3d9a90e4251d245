"""Tooling for segserve's Kubernetes manifests: render, validate, deploy (see k8s/README.md)."""
