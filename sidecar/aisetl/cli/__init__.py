"""Entry points: ``aisetl`` (daemons, local cluster) and ``ais`` (the client)."""
