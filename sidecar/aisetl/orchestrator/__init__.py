"""Transformer launchers: local processes and containers, or Kubernetes pods."""
