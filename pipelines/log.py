"""Messages to the terminal: one logger per step (``kd.<step>``: ``prepare``, ``search``, ``promote``, ...), one format
(``<step>: message``, as every step has always printed), one switch (``kd --quiet`` / ``--verbose``: :func:`set_verbosity`).

What a command returns as its result (``kd history``'s table, ``kd card``'s text, the main chain's summary) is printed;
what it says along the way is logged here. The handler writes to whatever ``sys.stdout`` is when a message is logged,
so a redirected or captured stream gets it; warnings go to ``sys.stderr``."""

from __future__ import annotations

import functools
import logging
import sys

ROOT = "kd"
VERBOSITY = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class _Console(logging.Handler):
    """Progress to ``sys.stdout``, warnings and errors to ``sys.stderr``: the streams of the moment a message is logged,
    not of the handler's creation."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed stream must not stop the step
            self.handleError(record)


class _StepFormatter(logging.Formatter):
    """``<step>: message`` for a step's logger (``kd.prepare``), the message alone for the root ``kd`` logger (whose
    messages name their subject themselves: ``teacher resnet: fold 2 ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        step = record.name.removeprefix(f"{ROOT}.") if record.name != ROOT else ""
        return f"{step}: {message}" if step else message


def _root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = _Console()
        handler.setFormatter(_StepFormatter())
        root.addHandler(handler)
        root.setLevel(VERBOSITY["normal"])
        root.propagate = False  # one line per message, whatever the application configures for the root logger
    return root


@functools.cache
def logger(step: str = "") -> logging.Logger:
    """The logger of ``step`` (empty: the root ``kd`` logger)."""
    root = _root()
    return root.getChild(step) if step else root


def set_verbosity(level: str) -> None:
    """``quiet`` (warnings and errors only), ``normal`` or ``verbose`` (debug messages too)."""
    _root().setLevel(VERBOSITY[level])


def chatty() -> bool:
    """Whether progress is shown (not ``--quiet``): Keras' per-epoch lines follow it."""
    return _root().isEnabledFor(logging.INFO)
