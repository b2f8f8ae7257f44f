"""Elastune's Prometheus metrics: the catalogue (every name the project emits) and the per-job
exporter that serves them."""
