import logging

import pytest

from nncift import console


def _run(args, tmp_path, corpus, tiny_overrides, capsys):
    from nncift.cli import main

    sets = [x for o in [*tiny_overrides, "ray.executor=local"] for x in ("--set", o)]
    rc = main(["data", "--run-dir", str(tmp_path / "run"), "--input", str(corpus), *sets, *args])
    return rc, capsys.readouterr().err


def test_default_console_shows_stage_lines_and_the_run_log_keeps_everything(tmp_path, corpus, tiny_overrides, capsys):
    rc, err = _run([], tmp_path, corpus, tiny_overrides, capsys)
    assert rc == 0
    lines = [x for x in err.splitlines() if x.strip()]
    assert any("stage data     running" in x for x in lines) and any("stage data     done in" in x for x in lines)
    assert not any("INFO nncift.stages.data" in x for x in lines), lines  # detail goes to the run log only
    log = (tmp_path / "run" / "logs" / "run.log").read_text()
    assert "INFO nncift.stages.data" in log and "stage data     done in" in log
    assert log.index("stage data     running") < log.index("stage data     done in")


def test_verbose_shows_every_info_line_and_quiet_none(tmp_path, corpus, tiny_overrides, capsys):
    rc, err = _run(["-v"], tmp_path / "v", corpus, tiny_overrides, capsys)
    assert rc == 0 and "INFO nncift.stages.data" in err
    rc, err = _run(["-q", "--overwrite"], tmp_path / "q", corpus, tiny_overrides, capsys)
    assert rc == 0 and "INFO" not in err


def test_a_run_that_fails_before_its_first_stage_leaves_no_log(tmp_path, capsys):
    from nncift.cli import main

    rc = main(["data", "--run-dir", str(tmp_path / "run"), "--input", str(tmp_path / "missing.jsonl")])
    assert rc == 2 and not (tmp_path / "run").exists()


def test_console_filter_levels():
    rec = logging.LogRecord("nncift.x", logging.INFO, __file__, 1, "m", None, None)
    flagged = logging.LogRecord("nncift.x", logging.INFO, __file__, 1, "m", None, None)
    flagged.console = True
    warn = logging.LogRecord("ray", logging.WARNING, __file__, 1, "m", None, None)
    f = console._ConsoleFilter()
    try:
        for verbosity, want in ((-1, (False, False, True)), (0, (False, True, True)), (1, (True, True, True))):
            console._state["verbosity"] = verbosity
            assert (f.filter(rec), f.filter(flagged), f.filter(warn)) == want
    finally:
        console._state["verbosity"] = 0


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    console._state["verbosity"] = 0
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_nncift", None) == "console":
            root.removeHandler(h)
