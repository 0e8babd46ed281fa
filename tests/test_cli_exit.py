"""How the ``fedsam`` process ends: without the interpreter's teardown, but with everything a
finished command owes (its exit code, its output, the libraries' exit handlers, its threads)."""

from __future__ import annotations

import subprocess
import sys

import fedsam
from tests.helpers import ROOT

ENDING = """
import atexit, sys, threading, time
from simulations.cli import exit_without_teardown
out = sys.argv[1]
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # never waited for
if sys.argv[2] == "worker":  # a non-daemon thread still working: the usual exit waits for it
    threading.Thread(target=lambda: (time.sleep(0.3), open(out + ".worker", "w").write("done"))).start()
print("no newline, still buffered", end="")
exit_without_teardown(3)
"""


def _end(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENDING, str(tmp_path / "mark"), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_the_exit_code_the_output_and_the_exit_handlers_survive(tmp_path):
    done = _end(tmp_path, "plain")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "no newline, still buffered"
    assert (tmp_path / "mark.atexit").read_text() == "ran"


def test_a_thread_still_working_is_waited_for(tmp_path):
    done = _end(tmp_path, "worker")
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "mark.worker").read_text() == "done"
    assert (tmp_path / "mark.atexit").read_text() == "ran"


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
