"""The thread a protocol server (OPC UA, Modbus) runs in, with its own asyncio loop."""

from __future__ import annotations

import abc
import asyncio
import logging
import threading


class AsyncServerThread(abc.ABC):
    """A server serving from its own asyncio loop in a daemon thread.

    A subclass implements `_serve()`: it sets the server up, awaits `_serving()` once it serves
    and shuts the server down when that returns (on `stop()`). `start()` returns once it
    serves, or raises what kept it from serving.
    """

    def __init__(self, name: str, where: str, thread_name: str, start_timeout_s: float) -> None:
        """`name` names the server in messages, `where` what it serves (an address, an endpoint)."""
        self.name = name
        self._where = where
        self._thread_name = thread_name
        self._start_timeout_s = start_timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        if not self._started.wait(self._start_timeout_s):
            raise TimeoutError(f"{self.name}: not serving after {self._start_timeout_s:g} s")
        if self._failure is not None:
            raise OSError(f"cannot serve {self._where}: {self._failure}") from self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(), or logged once serving
            if not self._started.is_set():
                self._failure = exc
                self._started.set()
            else:  # in the subclass's module's log, where its other messages go
                logging.getLogger(type(self).__module__).exception("%s stopped", self.name)

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10.0)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self._serve()

    @abc.abstractmethod
    async def _serve(self) -> None:
        """Set up and run the server in this loop, awaiting `_serving()` while it serves."""

    async def _serving(self) -> None:
        """The server is ready: let `start()` return, then wait for `stop()`."""
        assert self._stopping is not None
        self._started.set()
        await self._stopping.wait()
