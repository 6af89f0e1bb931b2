"""`minigpt serve`: load a run, start the scheduler, and run uvicorn over the app.

The socket is bound here, before the model loads, so a port in use is one sentence
at once, not a log line from inside uvicorn. The server binds 127.0.0.1 unless told
otherwise; any address other machines can reach is served with a warning unless an
API key guards it, and a server on loopback answers only requests that name it by
a loopback name (a web page cannot reach it by rebinding its own name to 127.0.0.1).

Threads: the scheduler's decode loop runs on the main thread, uvicorn's event loop
on a second one (on a CPU, torch runs a step fastest when the main thread starts it).

Signals: they land in `minigpt.signals`' handler, on the main thread (uvicorn takes
none off the main thread). The decode loop sees the flag; the server then stops
taking connections (a request that still arrives gets 503), lets the running
requests finish or cuts them within GRACE_S, and the command ends as every command
does: one word and 143 (or 130).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import threading
from pathlib import Path
from typing import Any

from minigpt import console, signals
from minigpt.errors import MinigptError, os_error

GRACE_S = 3.0
"""How long the requests in flight have to finish once a signal stops the server."""
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
"""The Host names a server bound to loopback answers to."""
SERVE_HINT = 'pip install "minigpt[serve]"'


def serve(
    run_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    api_key: str | None = None,
    device: str = "auto",
    *,
    max_waiting: int | None = None,
    compile_step: bool | None = None,
    quantize: str | None = None,
) -> None:
    """Serve the run (default: checkpoints/default) at http://host:port until SIGINT or
    SIGTERM (see the module docstring).

    api_key: with it, the API's routes need `Authorization: Bearer <api_key>`.
    max_waiting: continuations that may wait for a row (None: the scheduler's default).
    compile_step, quantize: as `generate`'s --compile and --quantize (`minigpt.inference`):
        the batch's static step is compiled before the server answers, so that no
        request waits for it.
    """
    require_web_stack()
    if api_key is not None and not api_key.strip():
        raise MinigptError(
            "the API key is empty", hint="give a key of some length, or none", param="api_key"
        )
    sock = bind(host, port)
    try:
        options = {"compile_step": compile_step, "quantize": quantize}
        _serve_on(sock, run_dir, max_batch, api_key, device, max_waiting, options)
    finally:
        sock.close()


def require_web_stack() -> None:
    """FastAPI and uvicorn, the `serve` extra, or one sentence saying how to get them."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise MinigptError(
            f"minigpt serve needs FastAPI and uvicorn, and {err.name or 'one'} is not installed",
            hint=SERVE_HINT,
        ) from err


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or one sentence why not."""
    if not 0 <= port <= 65535:
        raise MinigptError(
            f"port must be from 0 to 65535, got {port}", hint="8000 is usual", param="port"
        )
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise MinigptError(
            f"host {host!r} is not an address of this machine: {err.strerror}",
            hint="use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)",
            param="host",
        ) from err
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise MinigptError(
                f"port {port} on {host} is already in use",
                hint="choose another with --port, or stop the program that listens there",
                param="port",
            ) from err
        raise os_error(err, "listen on", f"{host}:{port}") from err
    sock.set_inheritable(True)
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0]).is_loopback


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _serve_on(
    sock: socket.socket,
    run_dir: str | Path | None,
    max_batch: int,
    api_key: str | None,
    device: str,
    max_waiting: int | None,
    options: dict[str, Any],
) -> None:
    """Load the run, build the scheduler and the app, and serve on sock until a signal."""
    from minigpt.checkpoint import DEFAULT_RUN_DIR
    from minigpt.serve.api import create_app

    run_dir = Path(DEFAULT_RUN_DIR if run_dir is None else run_dir)
    run, scheduler = load_scheduler(run_dir, device, max_batch, max_waiting, **options)
    model_id = run_dir.resolve().name
    hosts = LOOPBACK_NAMES if is_loopback(sock) else None
    app = create_app(run.model, run.tokenizer, model_id, scheduler, api_key, allowed_hosts=hosts)
    signals.check()  # a signal while the model loaded stops the command before it serves
    server = make_server(app, scheduler, sock)
    server.on_started = lambda: _say_serving(model_id, sock, api_key)
    # The decode loop runs on this, the main thread (see Scheduler.run); uvicorn on its
    # own, a daemon, so that an HTTP side that never returns cannot hold the exit open.
    web = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="minigpt-http", daemon=True
    )
    web.start()

    def stopping() -> bool:
        """A signal came (or uvicorn stopped): stop listening at once; the requests in
        flight get GRACE_S to finish."""
        if signals.pending() or not web.is_alive():
            server.should_exit = True
            return True
        return False

    try:
        scheduler.run(until=stopping, grace_s=GRACE_S)
    finally:
        server.should_exit = True
        scheduler.close(GRACE_S)
        web.join(GRACE_S + 10.0)
    if not server.started and not signals.pending():
        raise MinigptError("the HTTP server stopped before it served", hint="see its log above")


def load_scheduler(
    run_dir: str | Path,
    device: str = "auto",
    max_batch: int = 8,
    max_waiting: int | None = None,
    compile_step: bool | None = None,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """The run, loaded as `generate` loads it, and its scheduler: (run, scheduler). A
    static decode step is compiled here for the batch's max_batch rows (the seconds
    are noted), not in the first request."""
    from minigpt.inference import load_for_inference
    from minigpt.serve.scheduler import Scheduler

    loaded = load_for_inference(
        run_dir, device, quantize=quantize, compile_step=compile_step, note=console.note
    )
    run = loaded.run
    scheduler = Scheduler(
        run.model, run.tokenizer, max_batch, max_waiting, static=loaded.static_decode
    )
    seconds = scheduler.decoder.compile_step() if loaded.static_decode else 0.0
    if seconds:
        console.note(f"compiled the decode step for {max_batch} rows in {seconds:.1f} s")
    return run, scheduler


def _say_serving(model_id: str, sock: socket.socket, api_key: str | None) -> None:
    console.say(f"serving {model_id} at {url_of(sock)}")
    if not is_loopback(sock) and api_key is None:
        console.warn(
            f"{url_of(sock)} can be reached from other machines, and anyone who reaches it"
            " can use the model: set --api-key (or MINIGPT_API_KEY), or serve on 127.0.0.1"
        )


def make_server(app: Any, scheduler: Any, sock: socket.socket) -> Any:
    """A uvicorn server for app that closes the scheduler as it shuts down, so that
    requests in flight end within GRACE_S instead of holding the shutdown open."""
    import uvicorn

    class Server(uvicorn.Server):
        on_started: Any = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and self.on_started is not None:
                self.on_started()

        async def on_tick(self, counter: int) -> bool:
            if signals.pending():  # our handler took it: stop listening at once
                self.should_exit = True
            return await super().on_tick(counter)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            closing = asyncio.ensure_future(asyncio.to_thread(scheduler.close, GRACE_S))
            await super().shutdown(sockets)
            await closing

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(GRACE_S) + 2,
    )
    return Server(config)
