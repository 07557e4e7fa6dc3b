"""The gateway: stateless front door; validates, redirects, fans out, aggregates."""
