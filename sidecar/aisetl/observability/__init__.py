"""Metrics and structured logging, usable from every layer."""
