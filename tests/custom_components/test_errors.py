"""Plain reports of the package's own errors (custom_components.utils.errors)."""

from __future__ import annotations

import logging
import sys

import pytest

from custom_components.utils import errors


def _raise_project_error():
    from custom_components.handlers.runs import check_writable

    check_writable(before="inference", output_dir="/dev/null/sub")  # /dev/null is not a folder


@pytest.fixture
def plain_logging(monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    factory, hook = logging.getLogRecordFactory(), sys.excepthook
    assert errors.report_errors_plainly(force=True)
    yield
    logging.setLogRecordFactory(factory)
    sys.excepthook = hook


def _records_for(exc, caplog, name="test_errors"):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=name):
        try:
            raise exc
        except Exception:
            logging.getLogger(name).exception("Exception: stopped")
    return caplog.records


def test_library_log_of_a_project_error_keeps_the_line_but_not_the_traceback(plain_logging, caplog):
    with pytest.raises(PermissionError) as info:
        _raise_project_error()
    (record,) = _records_for(info.value, caplog)
    assert record.getMessage() == "Exception: stopped" and record.exc_info is None
    assert "output folder check failed before inference" in errors.format_project_error(info.value)


def test_other_errors_keep_their_traceback(plain_logging, caplog):
    (record,) = _records_for(ValueError("not ours"), caplog)
    assert record.exc_info is not None and errors.format_project_error(record.exc_info[1]) is None


def test_traceback_on_request(plain_logging, caplog, monkeypatch):
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    with pytest.raises(PermissionError) as info:
        _raise_project_error()
    (record,) = _records_for(info.value, caplog)
    assert record.exc_info is not None


def test_installing_twice_wraps_the_factory_once(plain_logging):
    once = logging.getLogRecordFactory()
    errors.report_errors_plainly(force=True)
    assert logging.getLogRecordFactory() is once


def test_outside_the_bundle_command_line_nothing_process_wide_changes():
    """Issue 20: a notebook or a MONAI Label server running a config's initialize keeps its own exception hook and
    log-record factory; only ``python -m monai.bundle run`` (or ``force``) installs the plain reports."""
    factory, hook = logging.getLogRecordFactory(), sys.excepthook
    assert errors.report_errors_plainly() is False
    assert logging.getLogRecordFactory() is factory and sys.excepthook is hook


def test_project_errors_are_reported_plainly_first():
    """Issue 10, item 14: the project's message, not MONAI's ConfigExpression wrapper, comes first."""
    from custom_components.data.datalist import DatalistError, check_datalist
    from custom_components.utils.errors import format_project_error

    def config_expression():
        try:
            check_datalist([])
        except DatalistError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression ...") from e

    with pytest.raises(RuntimeError) as e:
        config_expression()
    text = format_project_error(e.value)
    assert text.startswith("ERROR (DatalistError): datalist: the list of subjects is empty.")
    assert "custom_components/data/datalist.py" in text and "ConfigExpression" not in text
    assert format_project_error(RuntimeError("not ours")) is None


def test_an_error_raised_from_none_is_reported_not_the_one_it_replaced(tmp_path):
    """Issue 17, item 2: the lock refusal (raised "from None" while handling flock's BlockingIOError) was reported as
    'BlockingIOError: Resource temporarily unavailable'."""
    import subprocess
    import sys

    from custom_components.handlers.runs import RunLockedError, lock_run_dir

    code = ("import sys, time; from custom_components.handlers.runs import lock_run_dir; lock_run_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as e:
            lock_run_dir(tmp_path)
    finally:
        other.kill()
        other.wait()
    report = errors.format_project_error(e.value)
    assert report.startswith(f"ERROR (RunLockedError): run folder '{tmp_path}' (--output_dir) is in use by process "
                             f"{other.pid}")
