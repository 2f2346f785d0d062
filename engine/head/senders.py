"""The writer's sender loop: every node's sender as a coroutine of one event-loop thread.

Theory of operation
-------------------
The writer ships its tail to each node independently: a slow node gets larger frames and
holds nobody up (`engine.head.writer`). With a thread per node, and gRPC's synchronous API
under it, one put woke about twenty threads in the writer process: the six senders, and for
each of their streams the thread that feeds its requests to gRPC and the one that receives its
replies. Every wake is a context switch and a trip through the GIL. Measured on this project's
2-core machines, fanning one small message out to six servers and waiting for the six replies
cost the client ~1,080 us of CPU with six sender threads on synchronous streams, ~925 us with
those threads handing each exchange to a shared grpc.aio loop, and ~470 us with the six
exchanges as coroutines of that one loop (`docs/ARCHITECTURE.md`, "Writes").

So when the transport can (`append_async`, the gRPC transport), the writer runs its senders
here: one daemon thread runs an asyncio loop with a coroutine per node link. A coroutine does
what a sender thread did, with the same writer methods, so there is one policy for both:

1. `Writer._next_send(link, "poll")` under the writer lock: the records to send, or False
   (closed, fenced, the node was replaced: the coroutine ends), or the time until the link's
   heartbeat is due, when it waits on its wake event for at most that long;
2. a link that is down or full backs off first (`asyncio.sleep`), as a sender thread would;
3. `await transport.append_async(...)`, the same request on the same `AppendStream`;
4. the reply is booked in the loop (`Writer._sent`, a short hold of the writer lock that may
   release writers whose puts became durable); an error is `Writer._send_failed`, in a worker
   thread when it may block (an epoch refusal probes and syncs nodes over unary calls).

Wakes: `wake()` may be called from any thread; the writer calls it (under its lock) when a
put arrives while a coroutine waits, and when it closes or is fenced. The loop ends once the
writer stops serving and every coroutine has ended; it then closes its gRPC channels.
Transports without `append_async` (in-process, the fault injector) keep a thread per node.
"""

from __future__ import annotations

import asyncio
import logging
import threading

log = logging.getLogger("sixfold.writer")


class SenderLoop:
    """One writer's senders as coroutines of one event loop (see the module docstring)."""

    @staticmethod
    def serves(transport) -> bool:
        """Whether `transport` can be driven from the loop (it has `append_async`)."""
        return callable(getattr(type(transport), "append_async", None))

    def __init__(self, writer) -> None:
        self.writer = writer
        self._loop = asyncio.new_event_loop()
        self._wakes: dict[str, asyncio.Event] = {}
        self._live = 0
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="writer-senders", daemon=True)
        self._thread.start()

    # --- from any thread ----------------------------------------------------------------------
    def add(self, link) -> None:
        """Start the sender of `link` (a node of the membership)."""
        self._soon(self._start, link)

    def wake(self) -> None:
        """Every waiting sender looks for work again."""
        self._soon(self._wake_all)

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop ended (the writer stopped): nothing is left to send
            pass

    # --- in the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._done = asyncio.Event()
        await self._done.wait()
        try:
            await self.writer.transport.close_async()
        except Exception as e:  # closing is best effort: the process keeps serving
            log.warning("closing the sender loop's channels failed: %s: %s", type(e).__name__, e)

    def _start(self, link) -> None:
        if link.id in self._wakes:
            return
        self._wakes[link.id] = asyncio.Event()
        self._live += 1
        task = self._loop.create_task(self._sender(link), name=f"writer->{link.id}")
        task.add_done_callback(lambda _t, link_id=link.id: self._ended(link_id))

    def _ended(self, link_id: str) -> None:
        self._wakes.pop(link_id, None)
        self._live -= 1
        if not self._live and not self.writer.serving and self._done is not None:
            self._done.set()

    def _wake_all(self) -> None:
        for event in self._wakes.values():
            event.set()
        if not self._live and not self.writer.serving and self._done is not None:
            self._done.set()

    async def _sender(self, link) -> None:
        w = self.writer
        wake = self._wakes[link.id]
        while True:
            try:
                if not await self._send_once(w, link, wake):
                    return
            except Exception as e:  # a bug: log it once per cause, count it, carry on after a back-off
                await asyncio.sleep(w._sender_bug(link, e))

    async def _send_once(self, w, link, wake: asyncio.Event) -> bool:
        wake.clear()  # before looking: a wake from now on is not lost
        job = w._guarded(w._next_send, link, "poll")
        if job is False:
            return False
        if isinstance(job, float):  # nothing to send before the heartbeat is due
            try:
                await asyncio.wait_for(wake.wait(), max(job, 0.0))
            except asyncio.TimeoutError:
                pass
            return True
        if not link.up or link.full:
            await asyncio.sleep(link.backoff_s)
        records, frame = w._frame_of(link, job)
        link.last_send = sent_at = w._clock()
        try:
            reply = await w.transport.append_async(link.id, job.epoch, frame, job.hint, job.collect, job.requests)
        except Exception as e:
            if w._needs_thread(e):
                return await asyncio.to_thread(w._guarded, w._send_failed, link, e, job.epoch)
            return w._guarded(w._send_failed, link, e, job.epoch)
        return w._guarded(w._sent, link, job, records, frame, sent_at, reply)
