"""``ais etl ...`` and ``ais wait xaction``: added with the ETL feature."""

from __future__ import annotations

from typing import Any

from aisetl.cli import ais


def register(sub: Any) -> None:
    """Add ETL commands to the ``ais`` parser."""


ais.EXTENSIONS.append(register)
