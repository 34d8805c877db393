"""AsyncLLM: the engine for asyncio callers (the OpenAI server builds on it). Requests arrive at any time.

    llm = AsyncLLM(LLM("dynfocus-smol"))          # or AsyncLLM.from_model("dynfocus-smol", **LLM kwargs)
    async for output in llm.generate({"prompt": ..., "multi_modal_data": {"video": path}}, params, "req-1"):
        print(output.outputs[0].delta_text, end="")  # one RequestOutput per new token; the last has finished=True
    await llm.abort("req-1")                         # or just stop iterating / cancel the task: same effect

A background thread steps the engine while any request is unfinished (engine steps are blocking torch work; in the
event loop they would stall every other coroutine). Adds and aborts are handed to that thread and applied before
its next step, so an abort frees the request's KV blocks before any further step runs. Each request's outputs go to
its own asyncio.Queue through loop.call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from typing import AsyncIterator, Optional

from ..errors import RequestError
from ..outputs import RequestOutput
from ..sampling import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an unexpected error; the message names it. Create a new AsyncLLM."""


class AsyncLLM:
    def __init__(self, llm):
        """llm: an `engine.LLM` (its model, visual stage and KV cache are used; do not call its synchronous methods
        while this AsyncLLM serves requests)."""
        self.llm, self.engine = llm, llm.engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.dead_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="dynfocus-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: str = "dynfocus-smol", **llm_kwargs) -> "AsyncLLM":
        from ..engine import LLM
        return cls(LLM(model, **llm_kwargs))

    @property
    def notice(self) -> Optional[str]:
        return self.llm.notice

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    @property
    def model_name(self) -> str:
        return self.llm.loaded.name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> dict:
        """The engine's load and KV usage (LLMEngine.stats), plus the streams open here and whether the loop runs."""
        return {**self.engine.stats(), "open_streams": len(self._streams),
                "alive": self.dead_error is None and self._thread.is_alive()}

    async def generate(self, request, sampling_params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Stream one request: a RequestOutput whenever it has news (every generated token: outputs[i].text and
        token_ids cumulative, delta_text / delta_token_ids new; tokens and timings_ms its accounting). The last one
        has finished=True and a finish_reason ("stop", "length", "abort", or "error" with .error set: a bad request
        ends this way, it never raises here). A request_id already in flight is a RequestError. Leaving the loop
        early aborts the request and frees its KV cache: at once on cancellation or aclose(); after `break`, when
        the event loop finalises the generator (wrap it in contextlib.aclosing for an immediate abort)."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self.dead_error!r}")
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in flight: request ids must be unique")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._send(("add", request_id, request, sampling_params))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise EngineDeadError(f"the engine loop has stopped: {output!r}") from output
                finished = output.finished
                yield output
        finally:
            if not finished:
                self._send(("abort", request_id))
            self._streams.pop(request_id, None)

    async def chat(self, messages, sampling_params: Optional[SamplingParams] = None,
                   request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """generate() for one OpenAI-style conversation (see LLM.chat); a malformed one ends with an error output."""
        from ..chat import conversation_request
        try:
            request = conversation_request(messages, self.llm.loaded.template, self.llm.loaded.tokenizer)
        except RequestError as error:
            request = error
        async for output in self.generate(request, sampling_params, request_id):
            yield output

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason "abort" and its KV blocks are free before the next
        step."""
        self._send(("abort", str(request_id)))

    def shutdown(self) -> None:
        """Stop the loop (requests in flight are aborted). Idempotent."""
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.shutdown()

    # -- the engine thread ---------------------------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, outputs = target
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # its event loop is closed: nobody listens any more
                self._commands.put(("abort", request_id))

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, request, params = command
                if isinstance(request, BaseException):
                    self._deliver(request_id, RequestOutput(request_id, error=str(request), notice=self.notice))
                    continue
                try:
                    self.engine.add_request(request_id, request, params)
                except RequestError as error:
                    self._deliver(request_id, RequestOutput(request_id, error=str(error), notice=self.notice))
            else:
                self.engine.abort(command[1])

    def _loop(self) -> None:
        try:
            while not self._stopped:
                with self.llm._lock:
                    self._apply_commands()
                    busy = self.engine.has_unfinished_requests()
                    outputs = self.engine.step_with_ids() if busy else []
                for request_id, output in outputs:
                    self._deliver(request_id, output)
                if not busy:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
            with self.llm._lock:
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
        except BaseException as error:  # noqa: BLE001 - every waiting stream must hear of it
            self.dead_error = error
            for request_id in list(self._streams):
                self._deliver(request_id, error)
