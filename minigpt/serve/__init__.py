"""`minigpt serve`: an OpenAI-compatible HTTP server over a run, and a web page that
shows every attention head while the model writes.

    HTTP handlers (uvicorn's event loop, `api.py`)
        │ submit a job: its prompts, settings, n          ▲ events: text, tokens, logprobs
        ▼                                                 │
    the scheduler's decode thread (`scheduler.py`) ── one batch for every request
                                                       (`minigpt.batching`)

The web page (`page.py`, `static/`) is plain HTML, CSS and JS shipped with the package.
FastAPI and uvicorn are the `serve` extra, imported only when serving.
"""
