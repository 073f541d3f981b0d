"""Running the worker as a service: systemd notify and watchdog, SIGHUP reload, the /metrics and /healthz server.

Everything here runs on the worker's own event loop, beside :meth:`Worker.run`. A watchdog ping therefore proves
that the loop turns, and it is sent only while no dispatcher loop is stuck (see :func:`loop_stalled`): an idle
loop must come round, a loop in a batch must be within the batch's deadline. A stuck loop stops the pings and
systemd restarts the process, whose leases then expire and requeue its jobs.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.streams.stapled
import psycopg
from anyio.abc import SocketListener, SocketStream, TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter, ValidationError

from pgsynapse.config import SECRET_SETTINGS, Settings
from pgsynapse.db import pool_kwargs
from pgsynapse.errors import PgsynapseError
from pgsynapse.logs import configure_logging, get_logger
from pgsynapse.metrics import WorkerCollector, make_registry, render
from pgsynapse.queries import q
from pgsynapse.sdnotify import Notifier, StartPings, watchdog_interval
from pgsynapse.startup import StartingHttp, bind_metrics

if TYPE_CHECKING:
    from pgsynapse.listener.worker import Worker

log = get_logger(__name__)

# settings a SIGHUP applies to the running worker; any other change is logged as needing a restart
LIVE_SETTINGS = (
    "log_level", "log_format", "poll_interval", "batch_size", "max_attempts",
    "retry_backoff_seconds", "retry_backoff_max_seconds", "stall_seconds",
)


def tick_age(worker: Worker) -> float:
    """Seconds since the *least recently* turning dispatcher loop came round (each loop is tracked)."""
    return worker.stats.tick_age()


def loop_stalled(worker: Worker) -> float | None:
    """Seconds the most overdue dispatcher loop is past its limit, or None while the loops are healthy.

    An idle loop comes round at least every ``poll_interval``: one silent ``stall_seconds`` past that is stuck (a
    hung claim query). A loop in a batch is busy, not stuck, while the batch is within its deadline (its leases
    are renewed until then, however long it computes); past it, a model call or query hung, and it is stuck.
    The judgement is :meth:`Worker.stalled_loop`; None while stopping.
    """
    stalled = worker.stalled_loop()
    return stalled[0] if stalled else None


async def connect_error(worker: Worker) -> str:
    """Why the worker's pool gives no connection within the health check's wait: libpq's message for a new one
    (refused, a database not accepting connections, a timeout), or, when one can be made, that the pool is busy."""
    try:
        with anyio.fail_after(3.0):
            kwargs = {**pool_kwargs(worker.url, worker.settings, "pgsynapse-health"), "connect_timeout": 2}
            conn = await psycopg.AsyncConnection.connect(worker.url, **kwargs)
    except (psycopg.Error, OSError) as exc:
        return " ".join(str(exc).split())[:200] or type(exc).__name__
    except TimeoutError:
        return "no connection to the database within 3 s"
    await conn.close()
    return "no connection free in the worker's pool within 2 s (a new connection succeeds: every pooled one is busy)"


def file_overridden(settings: Settings) -> dict[str, dict[str, Any]]:
    """The config file's settings that the environment or the command line override with another value (the
    shipped unit's PGSYNAPSE_LOG_FORMAT=json, a variable of its EnvironmentFile): ``{name: {"file", "used", "by"}}``,
    a secret's values not shown."""
    out = {}
    for name, (raw, by) in sorted(settings._file_overridden.items()):
        used = getattr(settings, name)
        try:
            if name in ("kinds", "image_roots") and isinstance(raw, str):
                raw = [k.strip() for k in raw.split(",") if k.strip()]
            file = TypeAdapter(type(settings).model_fields[name].annotation).validate_python(raw)
        except ValidationError:
            file = raw  # invalid in the file: unused all the same
        if file == used:
            continue
        shown = {} if name in SECRET_SETTINGS else {"file": _plain(raw), "used": _plain(used)}
        out[name] = {**shown, "by": by}
    return out


def _plain(value: Any) -> Any:
    """A value as a log line shows it (JSON: a tuple as a list, a path as its text)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def warn_file_overridden(settings: Settings) -> list[str]:
    """Log ``config_file_overridden`` when the file has settings that something else overrides; their names."""
    overridden = file_overridden(settings)
    if overridden:
        log.warning("config_file_overridden", settings=overridden,
                    note="the environment (or the command line) sets these and wins over the config file, also on "
                    "reload: change them there (systemd: the unit's Environment= or its EnvironmentFile), or unset "
                    "them there for the file's value to count")
    return sorted(overridden)


def apply_reload(worker: Worker, new: Settings) -> dict[str, Any]:
    """Apply the live-changeable part of ``new`` to the running worker; returns what changed."""
    overridden = warn_file_overridden(new)
    old = worker.settings
    changed = {k: getattr(new, k) for k in LIVE_SETTINGS if getattr(new, k) != getattr(old, k)}
    needs_restart = sorted(
        k for k in type(new).model_fields if k not in LIVE_SETTINGS and getattr(new, k) != getattr(old, k)
    )
    worker.settings = old.model_copy(update=changed)
    if "log_level" in changed or "log_format" in changed:
        configure_logging(worker.settings.log_format, worker.settings.log_level)
    worker.wakeups.wake_all()  # waits restart with the new poll_interval
    log.info("config_reloaded", changed=changed, needs_restart=needs_restart, overridden=overridden)
    return changed


async def open_http(settings: Settings) -> SocketListener | None:
    """The metrics listener, bound now: a taken port fails fast (exit 78). ``run`` binds it at its very start instead
    (startup.py) and hands it to the service once started."""
    return await _listener(bind_metrics(settings))


async def _listener(socks: list[socket.socket]) -> SocketListener | None:
    listeners = [await SocketListener.from_socket(sock) for sock in socks]
    if len(listeners) > 1:
        return anyio.streams.stapled.MultiListener(listeners)  # type: ignore[return-value]
    return listeners[0] if listeners else None


class Service:
    """The service duties around one worker: ``await Service(worker, ...).run()`` beside ``worker.run()``."""

    def __init__(
        self,
        worker: Worker,
        *,
        reload: Callable[[], Settings] | None = None,
        http: SocketListener | None = None,
        notifier: Notifier | None = None,
        watchdog_every: float | None = None,
        starting: StartPings | None = None,
        early: StartingHttp | None = None,
    ) -> None:
        self.worker = worker
        self.starting = starting
        self.early = early
        self.reload = reload
        self.http = http
        self.notifier = notifier or Notifier.from_env()
        self.watchdog_every = watchdog_every if watchdog_every is not None else watchdog_interval()
        self.collector = WorkerCollector(worker)
        self.registry = make_registry(self.collector)
        self.watchdog_ok = True  # False while pings are withheld
        self._watchdog_changed = anyio.Event()

    async def wait_watchdog(self, ok: bool) -> None:
        """Return once the watchdog pings are sent (``ok``) or withheld (``not ok``)."""
        while self.watchdog_ok != ok:
            await self._watchdog_changed.wait()

    async def run(self) -> None:
        """Call once the worker has started (migrations applied, models loaded, LISTEN up). Runs until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                if self.early is not None and self.early.socks:
                    await anyio.to_thread.run_sync(self.early.stop)  # its answers end: the sockets are served here
                    self.http = await _listener(self.early.socks)
                if self.http is not None:
                    tg.start_soon(self.http.serve, self._handle_http)
                    # a MultiListener (metrics_host resolved to several addresses) says only its first one's
                    listeners = (self.http.listeners if isinstance(self.http, anyio.streams.stapled.MultiListener)
                                 else [self.http])
                    bound = [ln.extra(anyio.abc.SocketAttribute.local_address)[:2] for ln in listeners]
                    log.info("metrics_listening", hosts=[host for host, _ in bound], port=bound[0][1],
                             paths=["/metrics", "/healthz"])
                await tg.start(self._reload_on_sighup)  # a SIGHUP from READY=1 on reloads
                if self.watchdog_every:
                    tg.start_soon(self._watchdog)  # its first ping comes after READY=1 (no checkpoint between)
                if self.starting is not None:
                    self.starting.stop()  # started: the watchdog pings take over
                self.notifier.notify("READY=1", f"STATUS=processing {','.join(self.worker.kinds)}", wait=2.0)
                log.info("service_ready", systemd=self.notifier.enabled, watchdog_s=self.watchdog_every)
                await self.worker.stopping.wait()
                self.notifier.notify("STOPPING=1", f"STATUS=draining {self.worker.in_flight} in-flight batch(es)", wait=2.0)
                await anyio.sleep_forever()  # keep pinging and serving until the worker has drained
        finally:
            self.notifier.close()  # the HTTP listener is closed by its opener (serve)

    # -- watchdog ------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        assert self.watchdog_every
        while True:
            stalled = self.worker.stalled_loop()
            if stalled is None:
                self.notifier.notify("WATCHDOG=1")
                if not self.watchdog_ok:
                    log.info("watchdog_resumed")
            elif self.watchdog_ok:
                log.error("watchdog_withheld", reason=stalled[1], overdue_s=round(stalled[0], 1))
            if self.watchdog_ok != (stalled is None):
                self.watchdog_ok = stalled is None
                self._watchdog_changed.set()
                self._watchdog_changed = anyio.Event()
            await anyio.sleep(self.watchdog_every)

    # -- reload ----------------------------------------------------------------------------------
    async def _reload_on_sighup(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.reload is None:
            task_status.started()
            return
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            task_status.started()
            async for _ in signals:
                try:
                    new = self.reload()
                except PgsynapseError as exc:
                    log.error("config_reload_failed", error=str(exc), kept="previous settings")
                    continue
                apply_reload(self.worker, new)

    # -- HTTP ------------------------------------------------------------------------------------
    async def health(self) -> tuple[int, dict[str, Any]]:
        """``(http_status, body)``: 503 when the database is unreachable or a loop is stalled; LISTEN down
        (the dispatchers poll meanwhile) is ``degraded`` but still 200."""
        w = self.worker
        db_ok, db_error = False, None
        try:
            if w.pool is None:
                raise RuntimeError("worker not started")
            with anyio.fail_after(2.0):
                async with w.pool.connection() as conn:
                    await conn.execute(q("health_ping", "ops.sql"))
            db_ok = True
        except TimeoutError:  # the pool only says it waited: a connection of our own says why (a server down)
            db_error = await connect_error(w)
        except (psycopg.Error, OSError, RuntimeError) as exc:
            db_error = " ".join(str(exc).split())[:200] or type(exc).__name__
        overdue = loop_stalled(w)
        status = "ok" if db_ok and overdue is None and w.listener.connected else "degraded"
        if not db_ok or overdue is not None:
            status = "unhealthy"
        body = {
            "status": status,
            "worker": w.worker_id,
            "db_reachable": db_ok,
            "db_error": db_error,
            "listen_connected": w.listener.connected,
            "last_tick_age_seconds": round(tick_age(w), 3),
            "stall_limit_seconds": w.settings.poll_interval + w.settings.stall_seconds,
            "loop_overdue_seconds": round(overdue or 0.0, 3),
            "in_flight_batches": w.in_flight,
            "stopping": w.stopping.is_set(),
        }
        return (503 if status == "unhealthy" else 200), body

    async def _handle_http(self, stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(5):
                    request = b""
                    while b"\r\n\r\n" not in request and len(request) < 65536:
                        request += await stream.receive(65536)
                parts = request.split(b"\r\n", 1)[0].decode("latin-1").split()
                method, path = (parts + ["", ""])[:2]
                try:
                    code, ctype, payload = await self._route(method, path.split("?", 1)[0])
                except Exception as exc:  # noqa: BLE001 - one failed request never takes the worker down with it
                    log.error("http_request_failed", path=path[:200], error=f"{type(exc).__name__}: {exc}"[:500])
                    code, ctype, payload = 500, "text/plain", b"internal error: see the worker's log\n"
                head = (
                    f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                )
                await stream.send(head.encode() + (b"" if method == "HEAD" else payload))
            except (anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError, OSError):
                return

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            await self.collector.refresh()
            return 200, CONTENT_TYPE_LATEST, render(self.registry)
        if path == "/healthz":
            code, body = await self.health()
            return code, "application/json", (json.dumps(body) + "\n").encode()
        return 404, "text/plain", b"not found: try /metrics or /healthz\n"


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


async def serve(
    worker: Worker,
    *,
    reload: Callable[[], Settings] | None = None,
    starting: StartPings | None = None,
    early: StartingHttp | None = None,
    task_status: TaskStatus[Service] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``worker`` with its service duties until it stops (SIGINT/SIGTERM); returns after the drain.

    A start-up error is raised bare (not in an exception group), so the CLI maps it to its exit status. ``early``
    answers the metrics port until the worker has started (startup.py); the service answers it from then on.
    """
    http = None if early is not None else await open_http(worker.settings)
    service = Service(worker, reload=reload, http=http, starting=starting, early=early)
    try:
        async with anyio.create_task_group() as tg:

            async def run_worker(*, task_status: TaskStatus[None]) -> None:
                await worker.run(task_status=task_status)
                tg.cancel_scope.cancel()  # drained and stopped: end the service duties too

            await tg.start(run_worker)
            tg.start_soon(service.run)
            task_status.started(service)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        if service.http is not None:
            with anyio.CancelScope(shield=True):
                await service.http.aclose()
