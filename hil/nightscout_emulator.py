"""An emulated Nightscout site on loopback (the standard library's threading HTTP server:
four endpoints, kept small), with fault knobs, so the Nightscout sensor bridge is tested
without a server.

    python -m hil.nightscout_emulator --port 1337 --secret demo-secret-123 --cgm-every 5

serves, on 127.0.0.1 only, the API v1 subset the bridge uses (as described in
``mpc_dose/protocol/nightscout.py``): ``GET /api/v1/entries/sgv.json`` (and
``/api/v1/entries.json``) with ``count`` and ``find[date][$gt|$gte|$lt|$lte]``, newest first;
``POST /api/v1/treatments`` and ``POST /api/v1/devicestatus`` (kept in :attr:`treatments`,
:attr:`devicestatus`); ``GET /api/v1/status.json``. Every request needs the ``api-secret``
header (SHA-1 hex of the secret), as the real server's API does, else 401.

Fault knobs (attributes of :class:`NightscoutEmulator`, changeable while it runs):
``fail_status`` (answer every request with this HTTP status, e.g. 500), ``garbage`` (answer
GETs with this body instead of JSON), ``delay_s`` (answer this late: a client's time-out),
``frozen`` (the CGM generator adds no entry: a stale source); :meth:`add_sgv` puts any
value in (e.g. 30 or 450: the CGM's LOW/HIGH; 5: an error code). ``--cgm-every`` generates a
reading every so many seconds (a slow sine around 120 mg/dL) for demos.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

__all__ = ["NightscoutEmulator"]

_FIND_OPS = {"$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b,
             "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b}


class NightscoutEmulator:
    """A Nightscout site at :attr:`url` (127.0.0.1, *port* 0: a free one)."""

    def __init__(self, *, secret: str, port: int = 0, cgm_every_s: float | None = None
                 ) -> None:
        self.digest = hashlib.sha1(secret.encode("utf-8")).hexdigest()
        self.entries: list[dict] = []
        self.treatments: list[dict] = []
        self.devicestatus: list[dict] = []
        self.requests: list[tuple[str, str, int]] = []  # method, path, status answered
        self.fail_status: int | None = None
        self.garbage: bytes | None = None
        self.delay_s = 0.0
        self.frozen = False
        self.cgm_every_s = cgm_every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        owner = self

        class Handler(_Handler):
            emulator = owner

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._threads = [threading.Thread(target=self.server.serve_forever,
                                          kwargs={"poll_interval": 0.05}, daemon=True,
                                          name="nightscout-emulator")]
        if cgm_every_s:
            self._threads.append(threading.Thread(target=self._cgm, daemon=True,
                                                  name="nightscout-cgm"))

    def start(self) -> NightscoutEmulator:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def add_sgv(self, sgv: float, *, date_ms: int | None = None, noise: int | None = 1,
                direction: str = "Flat") -> dict:
        """Store an SGV entry (now, unless *date_ms* [ms UTC] is given)."""
        date_ms = int(time.time() * 1000) if date_ms is None else date_ms
        entry = {"_id": f"{date_ms:024x}", "type": "sgv", "sgv": sgv, "date": date_ms,
                 "dateString": time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                             time.gmtime(date_ms / 1000)),
                 "direction": direction, "device": "emulated-cgm"}
        if noise is not None:
            entry["noise"] = noise
        with self._lock:
            self.entries.append(entry)
        return entry

    def _cgm(self) -> None:
        start = time.time()
        while not self._stop.wait(0 if not self.entries else self.cgm_every_s):
            if not self.frozen:
                phase = 2 * math.pi * (time.time() - start) / 3600.0
                self.add_sgv(round(120 + 40 * math.sin(phase)))

    def _find(self, query: dict[str, list[str]]) -> list[dict]:
        with self._lock:
            entries = sorted(self.entries, key=lambda e: e["date"], reverse=True)
        for key, values in query.items():
            if key.startswith("find[date][") and key.endswith("]"):
                op = _FIND_OPS.get(key[len("find[date]["):-1])
                try:
                    bound = float(values[0])
                except ValueError:
                    continue
                if op is not None:
                    entries = [e for e in entries if op(e["date"], bound)]
        try:
            count = int(query.get("count", ["10"])[0])
        except ValueError:
            count = 10
        return entries[:max(0, count)]


class _Handler(BaseHTTPRequestHandler):
    emulator: NightscoutEmulator
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the tests read :attr:`requests`
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.emulator.requests.append((self.command, self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its time-out): nothing to tell it

    def _gate(self) -> bool:
        em = self.emulator
        if em.delay_s:
            time.sleep(em.delay_s)
        if self.headers.get("api-secret") != em.digest:
            self._answer(401, b'{"status":401,"message":"Unauthorized"}')
            return False
        if em.fail_status is not None:
            self._answer(em.fail_status, b'{"status":500,"message":"emulated failure"}')
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._gate():
            return
        em = self.emulator
        parts = urlsplit(self.path)
        if parts.path in ("/api/v1/entries/sgv.json", "/api/v1/entries.json"):
            body = em.garbage if em.garbage is not None else \
                json.dumps(em._find(parse_qs(parts.query))).encode()
            self._answer(200, body)
        elif parts.path == "/api/v1/status.json":
            self._answer(200, b'{"status":"ok","name":"nightscout-emulator"}')
        else:
            self._answer(404, b'{"status":404}')

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, 1 << 20))
        if not self._gate():
            return
        try:
            doc = json.loads(raw)
        except ValueError:
            self._answer(400, b'{"status":400}')
            return
        items = doc if isinstance(doc, list) else [doc]
        em = self.emulator
        path = urlsplit(self.path).path
        if path in ("/api/v1/treatments", "/api/v1/treatments.json"):
            em.treatments.extend(items)
        elif path in ("/api/v1/devicestatus", "/api/v1/devicestatus.json"):
            em.devicestatus.extend(items)
        else:
            self._answer(404, b'{"status":404}')
            return
        self._answer(200, json.dumps(items).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description="Emulated Nightscout site on 127.0.0.1")
    parser.add_argument("--port", type=int, default=1337)
    parser.add_argument("--secret", required=True, help="the site's API_SECRET")
    parser.add_argument("--cgm-every", type=float, default=300.0,
                        help="[s] between generated SGV entries (0: none)")
    args = parser.parse_args()
    emulator = NightscoutEmulator(secret=args.secret, port=args.port,
                                  cgm_every_s=args.cgm_every or None).start()
    print(emulator.url, flush=True)
    try:
        while True:
            time.sleep(5)
            if emulator.treatments or emulator.devicestatus:
                print(f"{len(emulator.treatments)} treatment(s), "
                      f"{len(emulator.devicestatus)} devicestatus record(s) posted", flush=True)
    except KeyboardInterrupt:
        emulator.close()


if __name__ == "__main__":
    main()
