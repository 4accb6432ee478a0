"""VM running time: how long a tenant's VMs ran inside a window, from their lifecycle records.

The VM gateway publishes ``vm_started`` at the start time, ``vm_stopped`` at the stop time
and ``vm_heartbeat`` while a VM is active (producers/vm_gateway.py). A window of a tenant
whose VMs send lifecycle records gets one more total, ``vm_running_seconds`` (aggregation
``time_weighted``: a 0/1 "running" gauge times seconds, so it adds up across windows and is
quotable like any additive metric; ``samples`` = the VMs counted): per VM, the time between
its start and its stop that falls inside the window, summed over VMs.

Decided from the window's own records only, so the result is the same in any arrival order
and after any replay, and needs no state that outlives the window:

* a VM counts in a window when it has a lifecycle record there (a start, stop or heartbeat);
* it runs from the window's start unless its first start/stop record there is a start (then
  from that start), and up to the window's end unless its last such record is a stop;
* a stop and a start at the same instant (a restart) are taken stop first: no gap, no
  double count; a start while running and a stop while stopped change nothing.

A VM that sends usage but no lifecycle record in a window is not counted there: there is
nothing to judge its running time by (the same rule as the heartbeat gap check). A VM's usage
between its start and its stop is then the sum of its windows' totals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal

__all__ = ["VM_RUNNING_AGGREGATION", "VM_RUNNING_METRIC", "running_ms", "vm_running_seconds"]

VM_RUNNING_METRIC = "vm_running_seconds"
VM_RUNNING_AGGREGATION = "time_weighted"
_MS_PER_SECOND = Decimal(1000)


def running_ms(start: int, end: int, starts: Iterable[int], stops: Iterable[int]) -> int:
    """Milliseconds one VM ran in window [start, end), given its start and stop times there."""
    events = sorted([(t, 1) for t in starts] + [(t, 0) for t in stops])  # stop before start
    since: int | None = start if not events or events[0][1] == 0 else None
    total = 0
    for t, is_start in events:
        if is_start:
            if since is None:
                since = t
        elif since is not None:
            total += max(0, t - since)
            since = None
    if since is not None:
        total += max(0, end - since)
    return total


def vm_running_seconds(
    start: int,
    end: int,
    vms: Iterable[str],
    starts: Mapping[str, Iterable[int]],
    stops: Mapping[str, Iterable[int]],
) -> tuple[Decimal, int] | None:
    """Seconds the given VMs ran in window [start, end) (exact, in milliseconds), and how
    many VMs; None when there are none."""
    counted = set(vms)
    if not counted:
        return None
    total = sum(running_ms(start, end, starts.get(vm, ()), stops.get(vm, ())) for vm in counted)
    return Decimal(total) / _MS_PER_SECOND, len(counted)
