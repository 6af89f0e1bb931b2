"""The scheduler: one decode thread that serves every request as one batch.

HTTP handlers run on the event loop; the model runs on a thread of its own. So a
forward pass never stalls the loop, and the model is never run by two requests at
once: each request's continuations wait in a queue, join the running batch when a
row is free (`minigpt.batching`), and leave it the step they end. Every step's
tokens go back to each request's handler as events, through the event loop.

Bounds: at most max_batch continuations decode at once, and at most max_waiting
wait; past that a request is refused (QueueFull: the client retries later). Memory
is therefore bounded by max_batch full contexts, allocated once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

from minigpt.batching import BatchDecoder, Continuation, Draw, TokenLogprob
from minigpt.errors import MinigptError
from minigpt.generate import document_start
from minigpt.model import GPT
from minigpt.sampling import MAX_SEED, Sampling
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.serve")

IDLE_WAIT_S = 0.5
"""How long the idle decode thread sleeps between looks at the queue (a submit wakes it)."""


def _never() -> bool:
    return False


class QueueFull(MinigptError):
    """Every row is busy and the waiting line is full: HTTP 429."""


class ShuttingDown(MinigptError):
    """The server is stopping and takes no new requests: HTTP 503."""


@dataclass
class ChoiceEvent:
    """What one choice of a job wrote since its last event.

    index: the choice (prompt_index * n + j, OpenAI's order). text: the text that
    became final (a stop string is never part of it). finish_reason: None while it
    runs, then "stop" (a stop string or end-of-text) or "length"; error: why it failed.
    """

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Job:
    """One request's continuations, as the handler sees them: their events, in order
    per choice, and `cancel` for a client that went away."""

    def __init__(
        self, prompt_ids: list[list[int]], n_choices: int, loop: asyncio.AbstractEventLoop
    ):
        self.prompt_ids, self.n_choices = prompt_ids, n_choices
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue[ChoiceEvent] = asyncio.Queue()

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """Every event of every choice; ends after each choice's last one. Events that
        piled up while the handler was busy come as one per choice: when the decode
        loop runs ahead of the network, a client gets fewer, larger pieces."""
        running = self.n_choices
        while running:
            waiting = [await self._events.get()]
            while not self._events.empty():
                waiting.append(self._events.get_nowait())
            for event in _merged(waiting):
                yield event
                if event.finish_reason is not None:
                    running -= 1

    def cancel(self) -> None:
        """Stop the job's continuations: their rows are freed at the next step."""
        self.cancelled = True

    def emit(self, event: ChoiceEvent) -> None:
        """Hand an event to the handler's loop (called from the decode thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


class Scheduler:
    """The decode thread and its waiting line (see the module docstring).

    static: decode with the rows' static step, compiled on a CPU (`BatchDecoder`).
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_waiting: int | None = None,
        static: bool = False,
    ):
        self.tokenizer = tokenizer
        self.block_size = model.config.block_size
        self.rolling = model.config.position == "rope"
        self.decoder = BatchDecoder(model, max_batch, tokenizer.vocab_size, static=static)
        self.max_waiting = 4 * max_batch if max_waiting is None else max_waiting
        self._waiting: deque[Continuation] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> int:
        return len(self.decoder.rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def run(self, until: Callable[[], bool] = _never, grace_s: float = 3.0) -> None:
        """Run the decode loop on this thread until the scheduler is closed, or until
        `until()` says to close it (with grace_s for the jobs in flight).

        `minigpt serve` runs it on the main thread: on a CPU, torch's threads run a
        small model's step several times slower when a second Python thread starts
        them, so the HTTP side gets the other thread."""
        self._run(until, grace_s)

    def start(self) -> None:
        """Run the decode loop on a thread of its own (tests, or a program that embeds
        the server and keeps its main thread)."""
        self._thread = threading.Thread(target=self._run, name="minigpt-decode", daemon=True)
        self._thread.start()

    def close(self, grace_s: float = 3.0) -> None:
        """Take no new jobs; let running ones finish, cutting what is left after grace_s.
        Waits for the decode thread when `start` started one."""
        self._begin_close(grace_s)
        if self._thread is not None:
            self._thread.join(grace_s + 5.0)

    def _begin_close(self, grace_s: float) -> None:
        with self._lock:
            self._closing = True
            self._deadline = min(self._deadline, time.monotonic() + grace_s)
        self._wake.set()

    def submit(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, *, n: int = 1, logprobs: int = 0
    ) -> Job:
        """Queue one continuation per prompt and choice; call from the event loop's thread.
        A seeded job draws choice i from seed + i, so it writes the same text however it
        is batched."""
        prompt_ids = [self._checked_prompt(list(ids)) for ids in prompts]
        job = Job(prompt_ids, len(prompt_ids) * n, asyncio.get_running_loop())
        continuations = []
        for index in range(job.n_choices):
            seed = None if sampling.seed is None else (sampling.seed + index) % (MAX_SEED + 1)
            settings = replace(sampling, seed=seed, num_samples=1)
            continuations.append(
                self.decoder.continuation(
                    self.tokenizer,
                    prompt_ids[index // n],
                    settings,
                    logprobs=logprobs,
                    owner=(job, index),
                )
            )
        with self._lock:
            if self._closing:
                raise ShuttingDown(
                    "the server is shutting down", hint="send the request to another server"
                )
            if len(self._waiting) + len(continuations) > self.max_waiting:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} continuations are waiting",
                    hint="retry in a moment",
                )
            self._waiting.extend(continuations)
        self._wake.set()
        return job

    def _checked_prompt(self, ids: list[int]) -> list[int]:
        """A prompt's ids as they run: an empty prompt starts a new document; a rotary
        model keeps the last block_size ids of a longer one (as `generate` does)."""
        ids = ids or document_start(self.tokenizer)
        if len(ids) > self.block_size and not self.rolling:
            raise MinigptError(
                f"the prompt has {len(ids)} tokens, more than this model's context of"
                f" {self.block_size}",
                hint=f"send at most {self.block_size} tokens of prompt",
                param="prompt",
            )
        return ids[-self.block_size :]

    # --- the decode thread -------------------------------------------------------------

    def _run(self, until: Callable[[], bool] = _never, grace_s: float = 3.0) -> None:
        while True:
            if not self._closing and until():
                self._begin_close(grace_s)
            with self._lock:
                closing, deadline = self._closing, self._deadline
                self._drop_cancelled()
                joining = self._take_waiting()
            if closing and (time.monotonic() >= deadline or not (joining or self.decoder.rows)):
                self._cut(joining)
                return
            try:
                for continuation in joining:
                    self.decoder.join(continuation)
                if not self.decoder.rows:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                for draw in self.decoder.step():
                    _emit(draw)
            except Exception as err:  # one bad step must not stop the server for all
                log.exception("decode step failed")
                self._fail_all(f"the decode step failed: {err}")

    def _drop_cancelled(self) -> None:
        """Forget the continuations of jobs whose clients went away (under the lock)."""
        for continuation in [c for c in self._waiting if c.owner[0].cancelled]:
            self._waiting.remove(continuation)
        for continuation in [c for c in self.decoder.rows if c.owner[0].cancelled]:
            self.decoder.leave(continuation)

    def _take_waiting(self) -> list[Continuation]:
        """As many waiting continuations as there are free rows (under the lock)."""
        joining = []
        while self._waiting and len(joining) < self.decoder.free:
            joining.append(self._waiting.popleft())
        return joining

    def _cut(self, joining: list[Continuation]) -> None:
        """End every continuation now, with what it has written (the server is stopping)."""
        with self._lock:
            left = [*joining, *self._waiting, *self.decoder.rows]
            self._waiting.clear()
        for continuation in left:
            job, index = continuation.owner
            text = continuation.stream.finish()
            job.emit(ChoiceEvent(index, text, finish_reason="length"))
        for continuation in list(self.decoder.rows):
            self.decoder.leave(continuation)

    def _fail_all(self, message: str) -> None:
        for continuation in list(self.decoder.rows):
            job, index = continuation.owner
            job.emit(ChoiceEvent(index, "", finish_reason="error", error=message))
            self.decoder.leave(continuation)


def _merged(events: list[ChoiceEvent]) -> list[ChoiceEvent]:
    """Events in order, those of one choice joined into one (its last says how it ended)."""
    by_choice: dict[int, ChoiceEvent] = {}
    for event in events:
        joined = by_choice.setdefault(event.index, ChoiceEvent(event.index, ""))
        joined.text += event.text
        joined.token_ids += event.token_ids
        joined.logprobs += event.logprobs
        joined.finish_reason, joined.error = event.finish_reason, event.error
    return list(by_choice.values())


def _emit(draw: Draw) -> None:
    """One step's draw as its job's event."""
    job, index = draw.continuation.owner
    logprobs = [draw.logprob] if draw.logprob is not None else []
    token_ids = [draw.token_id] if draw.finish_reason != "error" else []
    event = ChoiceEvent(index, draw.text, token_ids, logprobs, draw.finish_reason)
    event.error = draw.continuation.error
    job.emit(event)
