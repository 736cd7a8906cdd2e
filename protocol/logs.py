"""Structured logs: one JSON object per line on stderr, so a daemon's logs can be grepped and shipped as they are."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """Renders each record as one JSON line, merging the `fields` given to `event`, so logs can be grepped as is."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(component: str, level: str = "info", stream=None) -> logging.Logger:
    """Configure the root handler once (JSON lines) and return the component's logger."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
    return logging.getLogger(component)


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log `msg` with structured `fields` (they become keys of the JSON line)."""
    logger.log(level, msg, extra={"fields": fields})


_capture: dict = {}


def capture_native_output(component: str = "runtime") -> None:
    """Make every line on this process's stderr a JSON log line: native libraries write to file descriptor 2
    directly (LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", TensorFlow's C++ start-up
    logs, a traceback), past Python's logging. fd 2 becomes a pipe; a thread passes JSON lines through and wraps
    any other line as {"level": "info"|"warning", "component": COMPONENT, "msg": LINE}. At exit fd 2 is restored
    and the pipe drained, so a final traceback is not lost. The daemons call it after `setup`."""
    import atexit
    import os
    import threading

    if _capture:
        return
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    out = os.fdopen(original, "w", buffering=1, closefd=False)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line.strip():
                    continue
                if line.startswith("{"):
                    try:
                        json.loads(line)
                        out.write(line + "\n")
                        continue
                    except ValueError:
                        pass
                level = "info" if line.startswith(("INFO", "I0000", "I ")) else "warning"
                out.write(json.dumps({"ts": round(time.time(), 3), "level": level, "component": component,
                                      "msg": line}) + "\n")

    thread = threading.Thread(target=pump, name="stderr-json", daemon=True)
    thread.start()
    _capture.update(original=original, thread=thread)

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)   # closes the pipe's last write end: the pump reads to its end and stops
        thread.join(2.0)

    atexit.register(restore)
