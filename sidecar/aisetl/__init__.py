"""aisetl: AIS-ETL in Python — an object store whose storage targets run user
transforms next to their data.

Layers (imports point downward only, checked by import-linter in pyproject.toml):

    cli/                    the `ais` client and the `aisetl` daemon entry points
    gateway/  target/       aiohttp apps: routes and handlers, no business rules
    etl/  storage/          reconcile, communicators, offline jobs; the object store
    control/  orchestrator/ local and Kubernetes implementations of the two interfaces
    model/                  pure: names, specs, messages, placement, errors
    observability/          metrics and structured logging, usable from any layer
"""

__version__ = "0.1.0"
