"""Where commands run: on the worker itself (``local``) or on a target over ``ssh``.

Both honour one contract (:class:`Transport`): a timeout or a forced cancel kills the
command's whole process group before the error propagates, output is capped per stream,
and environment values (secrets) never reach a command line or a log.
"""

from opsexec.actions.transports.base import (
    DEFAULT_KILL_GRACE_S,
    DEFAULT_OUTPUT_LIMIT,
    CommandResult,
    Transport,
)
from opsexec.actions.transports.local import LocalTransport
from opsexec.actions.transports.ssh import SshTransport

__all__ = [
    "DEFAULT_KILL_GRACE_S",
    "DEFAULT_OUTPUT_LIMIT",
    "CommandResult",
    "LocalTransport",
    "SshTransport",
    "Transport",
]
