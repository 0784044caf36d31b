"""Rendering: the text exposition of a registry, made by the render thread when a scrape asks for
data newer than the last rendering, and the small part measured at each scrape (ages)."""

from __future__ import annotations

import gzip
import struct
import threading
import time
import zlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Every name we export is a classic one, so the text format 0.0.4 that every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


LabelTexts = dict[tuple[tuple[str, str], ...], str]
_LABEL_TEXTS_MAX = 50_000  # distinct label sets remembered; a render past it starts afresh


def render_text(registry: CollectorRegistry | Collector, label_texts: LabelTexts | None = None) -> bytes:
    """The text format 0.0.4 of a registry of gauges and counters, byte for byte what
    ``prometheus_client.generate_latest`` writes for them (a test holds it to that).

    generate_latest re-validates and re-escapes every label name on every sample: with hundreds of
    pods that was most of the agent's CPU. Our names are fixed and valid, so only label values are
    escaped here.
    A value that is not valid Unicode (a lone surrogate from the API's JSON) has the bad code
    points replaced rather than failing the render. Other metric types are refused rather than
    mis-rendered. ``label_texts`` carries the escaped label text of each label set from one render
    to the next: most of them (a device's, a pod's) recur every poll, and escaping them again was
    the larger part of a render.
    """
    texts: LabelTexts = {} if label_texts is None else label_texts
    if len(texts) > _LABEL_TEXTS_MAX:
        texts.clear()
    out: list[str] = []
    for family in registry.collect():
        if family.type not in ("gauge", "counter"):
            raise ValueError(f"render_text handles gauges and counters, not {family.type} ({family.name})")
        name = family.name + "_total" if family.type == "counter" and not _named_as_exposed(family) else family.name
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.labels:
                key = tuple(sample.labels.items())
                labels = texts.get(key)
                if labels is None:
                    labels = texts[key] = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(key))
                out.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
            else:
                out.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out).encode("utf-8", errors="replace")


def _named_as_exposed(family: Metric) -> bool:
    """A counter whose samples carry its name without _total (dcgm-exporter's): typed under that name."""
    return bool(family.samples) and family.samples[0].name == family.name


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class Exposition:
    """The latest rendering of a registry, plain and gzip, swapped in as one tuple, plus the
    families that must be measured at scrape time (ages), rendered per scrape and appended.

    Rendering is driven by scrapes, not polls: a poll marks the rendering out of date
    (``invalidate``), and the first scrape after it asks the render thread for a new one and waits
    for it (at most ``render_wait_s``). Polls come every second and scrapes every 15-30 s, so
    rendering after every poll spent most of the agent's CPU on bytes nobody read; a scrape still
    only copies bytes the render thread made. A rendering older than ``max_age_s`` (the renderer
    has stopped renewing it) is not served: its GPU series would be frozen values, so only the
    scrape-time families go out.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        at_scrape: Collector,
        max_age_s: float,
        render_wait_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._at_scrape = at_scrape
        self._max_age_s = max_age_s
        self._render_wait_s = render_wait_s
        self._clock = clock
        self._rendered: tuple[float | None, bytes, bytes] = (None, b"", b"")
        self._label_texts: LabelTexts = {}  # the render thread's alone
        self._tail_label_texts: LabelTexts = {}  # shared by scrapes: a lost race only escapes a label set twice
        self._changed = threading.Condition()
        self._data_generation = 0  # bumped by every poll
        self._rendered_generation = -1
        self._demanded = False

    def invalidate(self) -> None:
        """New data to render: called after each poll."""
        with self._changed:
            self._data_generation += 1

    def wait_for_demand(self, timeout_s: float) -> bool:
        """Blocks the render thread until a scrape wants a newer rendering (True) or the timeout."""
        with self._changed:
            self._changed.wait_for(lambda: self._demanded, timeout_s)
            demanded, self._demanded = self._demanded, False
            return demanded

    def current(self) -> bool:
        """True when the last rendering has the newest data: a scrape then waits for nothing."""
        with self._changed:
            return self._rendered_generation >= self._data_generation

    def wake(self) -> None:
        """Ends a ``wait_for_demand`` at once (the agent is stopping)."""
        with self._changed:
            self._demanded = True
            self._changed.notify_all()

    def render(self) -> None:
        with self._changed:
            generation = self._data_generation
        body = render_text(self._registry, self._label_texts)
        rendered = (self._clock(), body, gzip.compress(body, compresslevel=1))
        with self._changed:
            self._rendered = rendered
            self._rendered_generation = generation
            self._changed.notify_all()

    def latest(self, gzipped: bool) -> bytes:
        """The body of one scrape, as one bytes object."""
        return b"".join(self.latest_parts(gzipped))

    def latest_parts(self, gzipped: bool, wait: bool = True) -> tuple[bytes, bytes]:
        """The body of one scrape in two parts: the rendering shared by every scrape (not copied,
        so each client slow to read it does not hold a copy of its own) and the small per-scrape
        part. gzip members may be concatenated (RFC 1952), so the rendering compressed once is
        sent as it is, followed by the per-scrape part compressed. Without ``wait`` (the server's
        loop answering) a newer rendering is asked for but not waited for."""
        with self._changed:
            wanted = self._data_generation
            if self._rendered_generation < wanted:
                self._demanded = True
                self._changed.notify_all()
                if wait:
                    self._changed.wait_for(lambda: self._rendered_generation >= wanted, self._render_wait_s)
            rendered_at, plain, compressed = self._rendered
        if rendered_at is None or self._clock() - rendered_at > self._max_age_s:
            plain, compressed = b"", b""
        tail = render_text(self._at_scrape, self._tail_label_texts)
        if gzipped:
            return compressed, gzip_stored(tail)
        return plain, tail


def gzip_stored(data: bytes) -> bytes:
    """``data`` as a gzip member (RFC 1952) of stored deflate blocks (RFC 1951 3.2.4): the per-scrape
    part is a few hundred bytes of digits that compression barely shrinks, and setting up a
    compressor for it costs more than it saves."""
    blocks = [data[start : start + 0xFFFF] for start in range(0, len(data), 0xFFFF)] or [b""]
    out = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"]  # deflate, no flags, no mtime, OS unknown
    for position, block in enumerate(blocks):
        final = 1 if position == len(blocks) - 1 else 0
        out.append(struct.pack("<BHH", final, len(block), 0xFFFF ^ len(block)) + block)
    out.append(struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF))
    return b"".join(out)
