"""Flow control shared by both sides of a tunnel: backpressure, bulk reads, bounded memory.

Each side of a tunnel (the client's connection and the destination's) is a :class:`Side`.
Bytes read on one side are written to the other side's transport. When a side's write
buffer passes the high-water mark, asyncio calls its ``pause_writing`` and the *other*
side stops reading; ``resume_writing`` starts it again. That is the whole backpressure
scheme, and it lives here once instead of in each protocol.

Two read modes (see :class:`BulkReader`): tunnels start as plain Protocols, whose reads
are fresh ``bytes`` objects, cheap for the few small reads of a short tunnel; a side that
has carried ``bulk_threshold`` bytes switches to a BufferedProtocol reading up to
``read_buffer`` bytes into one buffer shared by every bulk reader on the loop.

Memory bound: uvloop keeps a reference to the unsent tail of a write rather than copying
it. Handing it a view of the shared 1 MiB buffer when the write cannot go out at once
would pin the whole buffer for a few bytes, once per read - a slow reader with a chatty
peer then costs hundreds of MiB. So the shared buffer is only ever handed over for a big
read into an empty write buffer (at most one pinned buffer per side at a time); small reads,
and any read while data is already queued, are copied. Per direction, a tunnel holds at
most ``write_high_water`` plus one read plus one pinned ``read_buffer``.
"""

from __future__ import annotations

import asyncio

#: Reads up to this size are copied rather than handed to the transport by reference.
COPY_BELOW = 64 * 1024


class ReadPool:
    """One read buffer shared by every bulk reader on the loop (reads never interleave)."""

    __slots__ = ("size", "view")

    def __init__(self, size: int) -> None:
        self.size = size
        self.view = memoryview(bytearray(size))

    def handed_over(self) -> None:
        """The transport kept a reference to the buffer: read into a fresh one from now on."""
        self.view = memoryview(bytearray(self.size))


class Side(asyncio.Protocol):
    """One end of a tunnel. Subclasses say where bytes go (``sink``) and who owns counting."""

    __slots__ = ("bulk", "reading_paused", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reading_paused = False
        self.bulk = False

    # --- what a subclass provides --------------------------------------------------------

    def other(self) -> Side | None:
        """The opposite side of the tunnel, when there is one."""
        raise NotImplementedError

    def sink(self) -> asyncio.Transport | None:
        """Where bytes read on this side are written, while they are being forwarded."""
        raise NotImplementedError

    def carried(self, nbytes: int) -> None:
        """Account for ``nbytes`` read on this side and forwarded (bytes, activity)."""
        raise NotImplementedError

    def pool(self) -> ReadPool:
        raise NotImplementedError

    def may_resume(self) -> bool:
        """False while reading must stay paused whatever the other side does."""
        return True

    # --- backpressure ---------------------------------------------------------------------

    def pause_reading(self) -> None:
        transport = self.transport
        if not self.reading_paused and transport is not None and not transport.is_closing():
            self.reading_paused = True
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.transport
        if self.reading_paused and transport is not None and self.may_resume():
            self.reading_paused = False
            if not transport.is_closing():
                transport.resume_reading()

    def pause_writing(self) -> None:
        other = self.other()
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.other()
        if other is not None:
            other.resume_reading()

    # --- bulk reads -------------------------------------------------------------------------

    def go_bulk(self) -> None:
        """Swap to the buffered reader; restarting the read makes uvloop use the new mode."""
        transport = self.transport
        if self.bulk or transport is None or transport.is_closing():
            return
        self.bulk = True
        paused = self.reading_paused
        transport.pause_reading()
        transport.set_protocol(BulkReader(self))
        if not paused:
            transport.resume_reading()

    def forward_from_pool(self, nbytes: int) -> None:
        """A bulk read of ``nbytes`` landed in the shared buffer: forward it, bounded."""
        self.carried(nbytes)
        sink = self.sink()
        if sink is None:
            return
        pool = self.pool()
        if nbytes < COPY_BELOW or sink.get_write_buffer_size():
            sink.write(bytes(pool.view[:nbytes]))  # copy: never pin the buffer for a tail
            return
        sink.write(pool.view[:nbytes])
        if sink.get_write_buffer_size():
            pool.handed_over()


class BulkReader(asyncio.BufferedProtocol):
    """The buffered read mode of a :class:`Side`; every other event goes back to it."""

    __slots__ = ("side",)

    def __init__(self, side: Side) -> None:
        self.side = side

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.side.pool().view

    def buffer_updated(self, nbytes: int) -> None:
        self.side.forward_from_pool(nbytes)

    def eof_received(self) -> bool | None:
        return self.side.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.side.connection_lost(exc)

    def pause_writing(self) -> None:
        self.side.pause_writing()

    def resume_writing(self) -> None:
        self.side.resume_writing()
