"""Mapped shared memory that a client cannot turn into a crash.

A system region mapped into this process is read in place and written through the mapping,
which halves the CPU a large tensor costs. But a page of a shared mapping past its file's
end faults with SIGBUS, and a client may truncate the object it registered at any time:
without a guard, one ``ftruncate`` while a request reads the region ends the server.

The guard (``_mapping_guard.c``, built at install time) handles SIGBUS inside a guarded
range by putting zero pages over what is left of it, so the access completes, and counts
the fault. A request whose region took a fault while it was read or written fails with a
400 (the bytes it saw are not the client's), and the region is refused from then on: it
must be registered again. A fault anywhere else goes to whatever handled SIGBUS before.

Where the extension could not be built (no C compiler at install), :data:`AVAILABLE` is
False and regions are read through their descriptors instead, which no client can harm.
"""

from __future__ import annotations

import ctypes
import mmap
from types import ModuleType

_native: ModuleType | None
try:
    import enginehouse.core._mapping_guard as _native
except ImportError:  # built without a C compiler
    _native = None

AVAILABLE = _native is not None


class GuardedMapping:
    """A range of a mapping under the guard, from construction until :meth:`close`."""

    def __init__(self, mapping: mmap.mmap) -> None:
        if _native is None:
            raise RuntimeError("the mapping guard is not built")
        length = len(mapping)
        # The address through a buffer export released at once: a live export would keep
        # the mapping from being closed.
        view = (ctypes.c_char * length).from_buffer(mapping)
        address = ctypes.addressof(view)
        del view
        self._slot: int | None = _native.add(address, length)
        self._final = 0

    def faults(self) -> int:
        """How many faults the range has taken (0 while its object is whole)."""
        if _native is None or self._slot is None:
            return self._final
        return int(_native.faults(self._slot))

    def close(self) -> None:
        """Stop guarding: only once nothing reads or writes the range any more."""
        if _native is not None and self._slot is not None:
            self._final = self.faults()
            _native.remove(self._slot)
            self._slot = None
