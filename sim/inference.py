"""A simulated BERT intent-detection replica: a real HTTP server (``GET /predict?query=music`` ->
``{"intent": "PlayMusic"}``) whose GPU is busy in proportion to the requests it serves.

The model: each request keeps the GPU busy for ``--cost-ms``; utilisation is the busy time of the
requests served in the last ``--window-s`` over that window (capped at 100 %), written to
``--status-file`` four times a second for the simulated node to report through the fake NVML.
``python -m sim.inference --port P --status-file F``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
from urllib.parse import parse_qs, urlsplit

from exporter.exposition.httpserver import Handler, Server

INTENTS = {
    "music": "PlayMusic",
    "song": "PlayMusic",
    "weather": "GetWeather",
    "rain": "GetWeather",
    "book": "BookRestaurant",
    "restaurant": "BookRestaurant",
    "alarm": "SetAlarm",
}


def intent(query: str) -> str:
    return next((name for word, name in INTENTS.items() if word in query.lower()), "Unknown")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status-file", required=True)
    parser.add_argument("--cost-ms", type=float, default=2.2)
    parser.add_argument("--window-s", type=float, default=1.0)
    args = parser.parse_args()
    served: collections.deque[float] = collections.deque()
    lock = threading.Lock()

    class Predict(Handler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            if url.path != "/predict":
                body, code = b'{"status": "ok"}', 200 if url.path == "/healthz" else 404
            else:
                query = parse_qs(url.query).get("query", [""])[0]
                with lock:
                    served.append(time.monotonic())
                body, code = json.dumps({"query": query, "intent": intent(query)}).encode(), 200
            self.send(code, body, "application/json")

    Server(("127.0.0.1", args.port), Predict, None).start()
    while True:
        now = time.monotonic()
        with lock:
            while served and served[0] < now - args.window_s:
                served.popleft()
            busy_ms = len(served) * args.cost_ms
        utilisation = min(100, round(100 * busy_ms / (args.window_s * 1000)))
        temporary = args.status_file + ".tmp"
        with open(temporary, "w") as out:
            out.write(str(utilisation))
        os.replace(temporary, args.status_file)
        time.sleep(0.25)


if __name__ == "__main__":
    main()
