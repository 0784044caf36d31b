"""The one way every NVML value is read: a fault-contained query, as nvitop's ``nvmlQuery``.

``DeviceQuery.value`` returns the value, or None, the one sentinel for "absent" (the reader's
records use None for "not measured", so a second sentinel would be tested for everywhere):
NOT_SUPPORTED leaves the value out, never 0, and says so once per device and value; a function
missing from the bindings (``AttributeError``) or the driver (FUNCTION_NOT_FOUND) is logged once
and the older call variant is used, or the value is left out for good; any other error is
counted and leaves that one value out. Which variant answers on a device (v2 memory info or v1,
TemperatureV or Temperature) is remembered in ``CallMemory``, not retried every poll. A lost GPU
(``pynvml.NVMLError`` GPU_IS_LOST, RESET_REQUIRED) and a lost library (``LibraryLostError``) are
raised: they end the read of the whole GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import pynvml

from exporter.catalogue import Call, Source
from exporter.model import DeviceError

log = logging.getLogger(__name__)

_ERROR_NAMES = {
    getattr(pynvml, name): name.removeprefix("NVML_ERROR_") for name in dir(pynvml) if name.startswith("NVML_ERROR_")
}
# Errors after which the handle itself is gone: the whole device is dropped from this poll.
DEVICE_FATAL = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED})
# Errors that mean NVML itself went away: re-initialise.
LIBRARY_FATAL = frozenset({pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED})
# The newer call variant does not answer on this device: use the older one.
_TRY_OLDER = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH})
# The error kind counted for an exception that is no NVML error (a bug, or bindings we do not know).
UNEXPECTED = "UNEXPECTED"


def error_kind(error: pynvml.NVMLError) -> str:
    return _ERROR_NAMES.get(error.value, f"CODE_{error.value}")


class LibraryLostError(Exception):
    """NVML itself went away during a read (uninitialised, driver unloaded)."""

    def __init__(self, error: pynvml.NVMLError) -> None:
        super().__init__(str(error))
        self.error = error


class Variant(NamedTuple):
    """One way to read a value: the binding's function name (to remember it missing) and the call,
    given the device handle."""

    function: str
    call: Callable[[Any], Any]


def binding(name: str, *args: Any) -> Variant:
    """A pynvml function called with the handle and ``args``, looked up when called: an older
    nvidia-ml-py without it raises AttributeError there, which the query contains."""
    return Variant(name, lambda handle: getattr(pynvml, name)(handle, *args))


def text(variant: Variant) -> Variant:
    """pynvml decodes names and UUIDs as strict UTF-8; a byte that is none gets U+FFFD instead of
    an exception (the exception carries the bytes the driver returned)."""

    def read(handle: Any) -> str:
        return decoded(lambda: variant.call(handle))

    return Variant(variant.function, read)


def decoded(call: Callable[[], Any]) -> str:
    try:
        return str(call())
    except UnicodeDecodeError as error:
        return bytes(error.object).decode("utf-8", errors="replace")


def _catalogue_variant(source: Source, call: Call) -> Variant:
    """A catalogue call, its answer made plain inside the contained call. The binding is looked up
    once (the module does not change while the agent runs)."""
    label = f"{call.function} ({call.version})" if call.version else call.function
    function = getattr(pynvml, call.function, None)
    version = getattr(pynvml, call.version, None) if call.version else None
    plain, args = source.plain, call.args
    if function is None or (call.version and version is None):

        def missing(_handle: Any) -> Any:
            raise AttributeError(f"pynvml has no {label}")

        return Variant(label, missing)
    if call.version:
        return Variant(label, lambda handle: plain(function(handle, *args, version=version)))
    return Variant(label, lambda handle: plain(function(handle, *args)))


def variants(source: Source) -> tuple[Variant, ...]:
    """A catalogue source's calls, newest first, as query variants."""
    return tuple(_catalogue_variant(source, call) for call in source.calls)


class CallMemory:
    """What this process learnt about the NVML calls, shared by every query: functions missing from
    the bindings or the driver (they do not come back while it runs), per (device, value) the
    variant that answers, and which faults were already logged."""

    def __init__(self) -> None:
        self.missing_functions: set[str] = set()
        self.variant_of: dict[tuple[str, str], int] = {}
        self._logged: set[tuple[Any, ...]] = set()

    def forget_function(self, function: str, where: str) -> None:
        if function not in self.missing_functions:
            self.missing_functions.add(function)
            log.warning("%s is not in %s here: the older call is used, or the value is left out", function, where)

    def first_time(self, *key: Any) -> bool:
        """True the first time ``key`` is seen: a fault that repeats every poll is logged once."""
        if key in self._logged:
            return False
        self._logged.add(key)
        return True


class DeviceQuery:
    """Contained reads of one device (a GPU or one of its MIG devices) during one read of its GPU;
    errors are counted on the GPU's ``index`` and the device's ``uuid``."""

    def __init__(self, memory: CallMemory, errors: list[DeviceError], index: int, uuid: str) -> None:
        self.memory = memory
        self.errors = errors
        self.index = index
        self.uuid = uuid

    def value(self, name: str, handle: Any, *variants: Variant, exported: bool = False) -> Any | None:
        """The first variant that answers, starting from the one that answered here before; None
        when unsupported, missing or failed. Lost GPUs and a lost library are raised. An
        ``exported`` value that is not supported is logged once: its series will be missing."""
        memory = self.memory
        remembered = (self.uuid, name)
        first = memory.variant_of.get(remembered, 0) if len(variants) > 1 else 0
        for position in range(first, len(variants)):
            function, call = variants[position]
            if function in memory.missing_functions:
                continue
            try:
                return call(handle)
            except pynvml.NVMLError as error:
                if error.value in LIBRARY_FATAL:
                    raise LibraryLostError(error) from error
                if error.value in DEVICE_FATAL:
                    raise
                if error.value == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                    memory.forget_function(function, "the driver")
                    continue
                if error.value in _TRY_OLDER and position + 1 < len(variants):
                    memory.variant_of[remembered] = position + 1
                    continue
                if error.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                    self._unsupported(name, exported)
                    return None
                self.count(error_kind(error))
                return None
            except AttributeError:  # not in these bindings (or a struct field they lack)
                memory.forget_function(function, "nvidia-ml-py")
                continue
            except Exception:
                self.count(UNEXPECTED)
                if memory.first_time("unexpected", self.uuid, name):
                    log.exception("GPU %d (%s): reading %s failed; left out", self.index, self.uuid, name)
                return None
        self._unsupported(name, exported)  # every variant is missing from the bindings or the driver
        return None

    def count(self, kind: str) -> None:
        self.errors.append(DeviceError(str(self.index), self.uuid, kind))

    def for_device(self, uuid: str) -> DeviceQuery:
        """The same GPU's errors, for another device of it (a MIG device)."""
        return DeviceQuery(self.memory, self.errors, self.index, uuid)

    def _unsupported(self, name: str, exported: bool) -> None:
        if exported and self.memory.first_time("unsupported", self.uuid, name):
            log.info("GPU %d (%s): %s not supported; that series is left out", self.index, self.uuid, name)
