"""Status lines on stderr: one short line per lifecycle event.

Everything mplaunch tells its user goes through the `mplaunch` logger so that
-v (details), the default (lifecycle events) and -q (errors only) are one
switch, and a service manager's journal gets the same lines.
"""

from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("mplaunch")


def configure(verbosity: int, vm_name: str | None = None) -> None:
    """verbosity: -1 quiet (errors only), 0 lifecycle events, 1 and more details."""
    level = logging.ERROR if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    prefix = f"mplaunch[{vm_name}]" if vm_name else "mplaunch"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
