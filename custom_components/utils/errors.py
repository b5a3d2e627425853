"""Show the bundle's own error messages plainly instead of inside MONAI's config-evaluation traceback.

``python -m monai.bundle run`` evaluates config expressions; an error raised by this package inside one arrives
wrapped in ``RuntimeError: Failed to evaluate ConfigExpression`` with a long traceback through MONAI and ignite.
:func:`report_errors_plainly` (first step of the configs' ``initialize``) installs an exception hook that prints
the innermost error raised by this package first, as one message, and the full traceback only on request
(environment variable ``SYNTHESIS_TRACEBACK=1``). Other errors are printed as Python always does.

The hook and the log-record filter are process-wide, so they are installed only by the bundle's command line
(``python -m monai.bundle run``): a notebook, a test or a MONAI Label server that parses the configs and runs their
``initialize`` keeps its own exception hook and log-record factory.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from types import TracebackType

__all__ = ["TRACEBACK_ENV", "format_project_error", "project_error", "report_errors_plainly", "running_call"]

TRACEBACK_ENV = "SYNTHESIS_TRACEBACK"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # custom_components/, above utils/


def _raised_here(exc: BaseException) -> tuple[str, int] | None:
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        path = os.path.abspath(frames[-1].filename)
        if os.path.commonpath([path, _PACKAGE_DIR]) == _PACKAGE_DIR:
            return os.path.relpath(path, _PACKAGE_DIR).replace(os.sep, "/"), frames[-1].lineno or 0
    return None


def project_error(exc: BaseException) -> BaseException | None:
    """The innermost exception of ``exc``'s chain (``__cause__``/``__context__``, except a context hidden by
    ``raise ... from None``) raised by this package, if any."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _raised_here(exc):
            found = exc
        # an error raised "from None" hides the one it replaced, as in Python's own report
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return found


def format_project_error(exc: BaseException) -> str | None:
    """The plain report of ``exc`` if this package raised it (or something it wraps), else ``None``."""
    err = project_error(exc)
    if err is None:
        return None
    where = _raised_here(err)
    return (f"ERROR ({type(err).__name__}): {err}\n"
            f"(raised in custom_components/{where[0]}:{where[1]}; set {TRACEBACK_ENV}=1 for the full traceback)\n")


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    message = format_project_error(exc)
    if message is None:
        sys.__excepthook__(exc_type, exc, tb)
        return
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        sys.__excepthook__(exc_type, exc, tb)
    sys.stderr.write(message)
    sys.stderr.flush()


def _without_project_tracebacks(factory):
    """A log-record factory that drops the traceback from records about an error raised by this package.

    Handlers of the training library (MONAI's ``StatsHandler`` logs every exception that stops an engine with its
    traceback) would otherwise print two long tracebacks before the plain message of :func:`_hook`; the log line
    itself (``Exception: <message>``) is kept.
    """

    def make(*args, **kwargs):
        record = factory(*args, **kwargs)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and os.environ.get(TRACEBACK_ENV, "") in ("", "0") and project_error(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return record

    make._plain_errors = True  # type: ignore[attr-defined]
    return make


def running_call(function_name: str, module_name: str) -> dict | None:
    """The locals of the innermost call of ``module_name.function_name`` on the caller's stack, or None (e.g.
    ``running_call("run", "monai.bundle.scripts")``: whether the caller runs under the bundle's command line)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function_name and frame.f_globals.get("__name__") == module_name:
            return frame.f_locals
        frame = frame.f_back
    return None


def report_errors_plainly(force: bool = False) -> bool:
    """Install the exception hook and the log-record filter for this process (idempotent), when it runs the bundle's
    command line (``monai.bundle.scripts.run`` on the stack) or with ``force``; return whether they are installed.
    Elsewhere (a notebook, a MONAI Label server parsing the configs) nothing process-wide is changed."""
    if not force and running_call("run", "monai.bundle.scripts") is None:
        return False
    sys.excepthook = _hook
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "_plain_errors", False):
        logging.setLogRecordFactory(_without_project_tracebacks(factory))
    return True
