"""Fault injection for the reliability tests: `LORAKIT_FAULT=<point>` makes the run fail at that point.

Points: `kill@<point>` SIGKILLs the process (a crash with no cleanup), `enospc@<point>` raises a
disk-full error, `nan@step-N` turns step N's loss into NaN. Save points are `save:files`,
`save:manifest`, `save:rename` and `save:rotate`; `step-N:micro-K` is before micro-batch K of step N.
With several training processes every one acts on it, unless `LORAKIT_FAULT_RANK=R` names the one.
Unset (always, outside tests) it costs one dictionary lookup.
"""

import errno
import os
import signal


def at(point: str) -> None:
    """Called by the loop and checkpoint code at each named point."""
    fault = os.environ.get("LORAKIT_FAULT")
    if not fault:
        return
    action, _, where = fault.partition("@")
    if where != point or os.environ.get("LORAKIT_FAULT_RANK", os.environ.get("RANK")) != os.environ.get("RANK"):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)


def poisons(step: int) -> bool:
    """True when the test asked for step `step`'s loss to be NaN."""
    return os.environ.get("LORAKIT_FAULT") == f"nan@step-{step}"
