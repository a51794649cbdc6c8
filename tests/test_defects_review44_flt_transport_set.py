"""Review 44 (flt44): `TransportSet` read while a transport is collected in another thread.

fix43 made adds and reads of an engine's transports take one lock and reads iterate a
copy; rvw43 noted that CPython's own `WeakSet._remove` (the weakref callback, run in
whichever thread drops a transport's last reference) takes no lock. The callback looks
at `_iterating` (is anyone iterating?) and then discards from `data`; a read that began
its iteration of `data` between those two steps saw the set change size under it:
`RuntimeError: Set changed size during iteration` in `_forget_breakers`, an engine
change told to the transports, or the admin page. Shown here deterministically: the
callback is held between its check and its discard while the read starts, and the read
is held inside its iteration while the callback discards. Now a read copies `data` in
one C call (no other thread runs, no callback, during it) and calls the copies' refs.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

from fidelity_mw.engine import TransportSet

WAIT_S = 60.0  # generous bounds for a starved machine; never reached when it works


class Item:
    """Stands for a transport (weakly referenced)."""


class _HeldRef(weakref.ref):  # type: ignore[type-arg]
    """A ref in the set's data whose call (the read's `itemref()`) waits for `go`."""

    started: threading.Event
    go: threading.Event

    def __call__(self) -> Any:
        self.started.set()
        self.go.wait(WAIT_S)
        return super().__call__()


class _CheckedThenHeld(set):  # type: ignore[type-arg]
    """`WeakSet._iterating`: the callback's truth test (`if self._iterating:`) answers
    as of now, then waits for the read to be inside its iteration (thread B only)."""

    def __init__(self, thread_name: str, checked: threading.Event, reading: threading.Event):
        super().__init__()
        self.thread_name = thread_name
        self.checked = checked
        self.reading = reading

    def __len__(self) -> int:
        n = super().__len__()
        if threading.current_thread().name == self.thread_name and not self.checked.is_set():
            self.checked.set()
            self.reading.wait(WAIT_S)
        return n


def test_a_transport_collected_in_another_thread_during_a_read() -> None:
    transports = TransportSet()
    keep = Item()
    transports.add(keep)
    doomed: list[Item] = [Item()]
    transports.add(doomed[0])
    anchor = Item()
    held = _HeldRef(anchor)
    held.started = threading.Event()
    held.go = threading.Event()
    checked = threading.Event()
    transports._iterating = _CheckedThenHeld("collector", checked, held.started)  # type: ignore[attr-defined]
    transports.data.add(held)

    def collect() -> None:
        doomed.pop()  # the last reference: the callback runs here, in this thread
        held.go.set()  # (its discard is done when the pop returns)

    collector = threading.Thread(target=collect, name="collector")
    gc.disable()  # the drop is by reference count, in the collector thread only
    try:
        collector.start()
        assert checked.wait(WAIT_S)  # the callback saw nobody iterating, and waits
        read = list(transports)  # before: RuntimeError: Set changed size during iteration
    finally:
        held.go.set()
        collector.join(WAIT_S)
        gc.enable()
    assert not collector.is_alive()
    assert keep in read
    assert anchor in read
    assert len(read) == 2  # the collected one is not read
    assert len(list(transports)) == 2


def test_reads_and_adds_still_see_every_live_transport() -> None:
    transports = TransportSet()
    items = [Item() for _ in range(50)]
    for item in items:
        transports.add(item)
    del items[::2]
    gc.collect()
    assert set(map(id, transports)) == set(map(id, items))
    assert len(transports) == 25
    copy = TransportSet(transports)
    assert set(map(id, copy)) == set(map(id, items))
