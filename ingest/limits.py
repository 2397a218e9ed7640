"""What bounds a service against its clients: stream slots per vehicle and in total, and rejection logs that a hostile
client cannot flood.

`StreamSlots` counts open streams; a stream past a cap is refused with `too_many_streams` (RESOURCE_EXHAUSTED and a
retry hint at the server). `RejectionLog` logs each refusal once with structured fields (`vehicle_id`, `drive_id`,
`reason`, `status`, `detail`: the JSON log format carries them as fields), at most `rate_per_s` lines a second after
a burst; the refusals it skipped are counted in the next line it writes (`suppressed`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from ingest.contract import ChunkRejected, RejectReason


class StreamSlots:
    """Open streams, in total and per vehicle; `take` refuses a stream past either cap."""

    def __init__(self, total: int, per_vehicle: int) -> None:
        self.total, self.per_vehicle = total, per_vehicle
        self.open = 0
        self.by_vehicle: Counter[str] = Counter()

    def take(self) -> None:
        """One more stream, its vehicle not known yet (`take_vehicle` once it is)."""
        if self.open >= self.total:
            raise ChunkRejected(RejectReason.TOO_MANY_STREAMS, f"{self.open} streams are open, the server's limit "
                                f"is {self.total}; retry later")
        self.open += 1

    def take_vehicle(self, vehicle: str) -> None:
        if self.by_vehicle[vehicle] >= self.per_vehicle:
            raise ChunkRejected(RejectReason.TOO_MANY_STREAMS, f"vehicle {vehicle!r} has {self.by_vehicle[vehicle]} "
                                f"streams open, the limit per vehicle is {self.per_vehicle}; retry later")
        self.by_vehicle[vehicle] += 1

    def give(self, vehicle: str | None) -> None:
        """A stream ended: `vehicle` is what `take_vehicle` counted, None when it did not."""
        self.open -= 1
        if vehicle is not None:
            self.by_vehicle[vehicle] -= 1
            if not self.by_vehicle[vehicle]:
                del self.by_vehicle[vehicle]


class RejectionLog:
    """Rate-limited structured logging of refusals (token bucket: `burst` lines at once, `rate_per_s` after)."""

    def __init__(self, logger: logging.Logger, rate_per_s: float, burst: int) -> None:
        self.logger, self.rate, self.burst = logger, rate_per_s, burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def _allow(self) -> tuple[bool, int]:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens < 1:
                self._suppressed += 1
                return False, 0
            self._tokens -= 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed

    def rejected(self, reason: str, status: str, vehicle_id: str | None, drive_id: str | None, detail: str) -> bool:
        """Log one refusal (WARNING) unless over the rate; returns whether it was written."""
        ok, suppressed = self._allow()
        if ok:
            fields = {"vehicle_id": vehicle_id, "drive_id": drive_id, "reason": reason, "status": status,
                      "detail": detail[:300], "suppressed": suppressed}
            self.logger.warning("refused vehicle=%s drive=%s reason=%s status=%s%s", vehicle_id, drive_id, reason,
                                status, f" ({suppressed} more refusals not logged)" if suppressed else "",
                                extra=fields)
        return ok


def serve_metrics(host: str, port: int):
    """Serve prometheus_client's registry on host:port (loopback by default in the configs: the metrics say who
    uploads what, so exposing them is a choice); returns the HTTP server, whose `server_address` is where it listens."""
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", *server.server_address[:2])
    return server
