"""Small asyncio helpers shared by every layer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it, without swallowing our own cancellation.

    An exception the task ended with is logged, not raised: stopping must
    always finish (one broken ETL must not block later reconciles or shutdown).
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves
    except Exception:
        log.exception("task %s had failed", task.get_name())
