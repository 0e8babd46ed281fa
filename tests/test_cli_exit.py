"""How the ``fedsam`` process ends: without the interpreter's teardown, but with everything a
finished command owes (its exit code, its output, the libraries' exit handlers, its threads)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

import fedsam
from tests.helpers import ROOT

ENDING = """
import atexit, sys, threading, time
from simulations.cli import exit_without_teardown
out = sys.argv[1]
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))


class TornDown:  # a module global: only the interpreter's teardown deletes it
    def __init__(self, path, opener):  # what __del__ needs, kept while the teardown clears the globals
        self.path, self.opener = path, opener

    def __del__(self):
        with self.opener(self.path, "w") as f:
            f.write("ran")


torn_down = TornDown(out + ".teardown", open)
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # never waited for
if sys.argv[2] == "profiled":  # as under cProfile, which writes its file after the code returns
    sys.setprofile(lambda *args: None)
if sys.argv[2] == "worker":  # a non-daemon thread still working: the usual exit waits for it
    threading.Thread(target=lambda: (time.sleep(0.3), open(out + ".worker", "w").write("done"))).start()
print("no newline, still buffered", end="")
exit_without_teardown(3)
"""


def _end(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENDING, str(tmp_path / "mark"), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_teardown_is_skipped_but_the_exit_code_the_output_and_the_exit_handlers_survive(tmp_path):
    done = _end(tmp_path, "plain")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "no newline, still buffered"
    assert (tmp_path / "mark.atexit").read_text() == "ran"
    assert not (tmp_path / "mark.teardown").exists()


@pytest.mark.parametrize("mode", ["worker", "profiled"])
def test_a_thread_still_working_or_a_profiler_gets_the_usual_exit(tmp_path, mode):
    done = _end(tmp_path, mode)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "no newline, still buffered"
    assert (tmp_path / "mark.atexit").read_text() == "ran"
    assert (tmp_path / "mark.teardown").exists()  # (a profiler still running there may cut its write short)
    if mode == "worker":
        assert (tmp_path / "mark.worker").read_text() == "done"


def test_a_command_started_with_its_output_closed_keeps_its_code(tmp_path):
    """With descriptor 1 closed Python's ``sys.stdout`` is ``None``: nothing to flush."""
    command = " ".join(shlex.quote(arg) for arg in [sys.executable, "-c", ENDING, str(tmp_path / "mark"), "plain"])
    done = subprocess.run(f"exec {command} >&-", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "mark.atexit").read_text() == "ran"


@pytest.mark.long
def test_the_command_keeps_its_exit_codes():
    def code(*argv: str) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, "-m", "simulations", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr

    assert code("--version")[:2] == (0, f"fedsam {fedsam.__version__}\n")
    status, _, err = code("--bogus")
    assert status == 2 and err.count("\n") == 1 and "unrecognized arguments: --bogus" in err
    status, _, err = code("report", "/nonexistent-folder")
    assert status == 2 and err == "fedsam report: error: /nonexistent-folder is not a folder\n"
