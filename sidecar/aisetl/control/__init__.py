"""The control store: buckets, membership, ETL declarations and status.

``base.ControlStore`` is the interface; ``local.LocalControlStore`` keeps it in
the state directory (one machine, `aisetl up`); a Kubernetes implementation
keeps it in ConfigMaps and pods. Nothing above this layer knows which one runs.
"""
