"""The serve scheduler: every request decoded in one batch by one thread; a seeded
request writes the same text however it is batched; the waiting line is bounded; a
cancelled job frees its rows at the next step; closing cuts what runs and refuses more."""

import asyncio
import time

import pytest
import torch

from minigpt.errors import MinigptError
from minigpt.generate import generate
from minigpt.sampling import Sampling
from minigpt.serve.scheduler import QueueFull, Scheduler, ShuttingDown
from minigpt.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz \n")


@pytest.fixture
def scheduler_of(tiny_gpt, tokenizer):
    started = []

    def make(max_batch=2, max_waiting=None, **options):
        model = tiny_gpt(tokenizer.vocab_size, block_size=16, **options)
        scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_waiting=max_waiting)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield make
    for scheduler in started:
        scheduler.close(grace_s=0.0)


async def texts_of(job):
    texts, reasons = {}, {}
    async for event in job.events():
        texts[event.index] = texts.get(event.index, "") + event.text
        if event.finish_reason:
            reasons[event.index] = event.finish_reason
    return [texts[i] for i in range(job.n_choices)], reasons


def test_a_seeded_job_writes_the_same_text_alone_and_batched(scheduler_of, tokenizer):
    scheduler = scheduler_of(max_batch=3)
    sampling = Sampling(max_new_tokens=24, temperature=0.9, seed=7)
    prompt = tokenizer.encode("hello")

    async def alone():
        return await texts_of(scheduler.submit([prompt], sampling, n=2))

    async def crowded():
        others = [
            scheduler.submit([tokenizer.encode(p)], Sampling(max_new_tokens=30))
            for p in ("abc", "zz", "q")
        ]
        mine = scheduler.submit([prompt], sampling, n=2)
        results = await asyncio.gather(texts_of(mine), *(texts_of(o) for o in others))
        return results[0]

    first, second = asyncio.run(alone()), asyncio.run(crowded())
    assert first == second
    assert first[0][0] != first[0][1]  # choice i draws from seed + i


def test_greedy_choices_match_generate(scheduler_of, tokenizer):
    scheduler = scheduler_of(position="rope")
    prompts = [tokenizer.encode("abc"), tokenizer.encode("hello there")]
    job_texts = asyncio.run(
        texts_of_submit(scheduler, prompts, Sampling(max_new_tokens=20, temperature=0))
    )
    model = scheduler.decoder.model
    for prompt, text in zip(prompts, job_texts[0], strict=True):
        alone = [int(t) for t in generate(model, prompt, 20, temperature=0)]
        assert text == tokenizer.decode(alone)


async def texts_of_submit(scheduler, prompts, sampling, **options):
    return await texts_of(scheduler.submit(prompts, sampling, **options))


def test_a_full_waiting_line_is_refused(scheduler_of, tokenizer):
    scheduler = scheduler_of(max_batch=1, max_waiting=2)

    async def flood():
        running = scheduler.submit([[1]], Sampling(max_new_tokens=100_000))
        await until(lambda: scheduler.running == 1)
        waiting = scheduler.submit([[1]], Sampling(max_new_tokens=2), n=2)  # the line is full
        with pytest.raises(QueueFull, match="busy"):
            scheduler.submit([[1]], Sampling(max_new_tokens=2))
        running.cancel()
        await texts_of(waiting)

    asyncio.run(flood())


async def until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the scheduler did not get there in time"
        await asyncio.sleep(0.005)


def test_a_cancelled_job_frees_its_rows(scheduler_of, tokenizer):
    scheduler = scheduler_of(max_batch=2, position="rope")

    async def cancel_midway():
        job = scheduler.submit([[1]], Sampling(max_new_tokens=100_000), n=2)
        events = job.events()
        await events.__anext__()
        assert scheduler.running == 2
        job.cancel()
        deadline = time.monotonic() + 5
        while scheduler.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert scheduler.running == 0

    asyncio.run(cancel_midway())


def test_closing_cuts_running_jobs_and_refuses_new_ones(scheduler_of, tokenizer):
    scheduler = scheduler_of(max_batch=1, position="rope")

    async def close_midway():
        job = scheduler.submit([[1]], Sampling(max_new_tokens=100_000))
        events = job.events()
        await events.__anext__()
        started = time.monotonic()
        await asyncio.to_thread(scheduler.close, 0.2)
        assert time.monotonic() - started < 5
        last = [event async for event in events][-1]
        assert last.finish_reason == "length"
        with pytest.raises(ShuttingDown):
            scheduler.submit([[1]], Sampling(max_new_tokens=1))

    asyncio.run(close_midway())


def test_a_prompt_past_the_context_is_refused_or_cropped(scheduler_of, tokenizer):
    learned, rope = scheduler_of(), scheduler_of(position="rope")
    long_prompt = [1] * 40

    async def submit_both():
        with pytest.raises(MinigptError, match="more than this model's context of 16") as err:
            learned.submit([long_prompt], Sampling(max_new_tokens=1))
        assert err.value.param == "prompt"
        job = rope.submit([long_prompt], Sampling(max_new_tokens=1))
        assert job.prompt_ids == [[1] * 16]
        await texts_of(job)

    asyncio.run(submit_both())


def test_the_decode_thread_runs_every_forward(scheduler_of, tokenizer, monkeypatch):
    scheduler = scheduler_of()
    threads = set()
    model = scheduler.decoder.model
    original = model.forward

    def spy(*args, **kwargs):
        import threading

        threads.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    asyncio.run(texts_of_submit(scheduler, [[1], [2]], Sampling(max_new_tokens=3)))
    assert threads == {"minigpt-decode"}
    torch.testing.assert_close(model.tok_emb.weight, model.lm_head.weight)
