"""The CLI where users type names: --help and usage errors answer at once without importing torch, and nothing is
looked up on a hub unless --online is given (an unknown name or a missing MERGED directory is exit 2 in well under a
second, naming the closest packaged model)."""

import subprocess
import sys
import time

import pytest

PROBE = """
import sys, time
t = time.perf_counter()
from tie_guard.cli import main
rc = main(sys.argv[1:])
print("RESULT", rc, "torch" in sys.modules, "transformers" in sys.modules, time.perf_counter() - t, file=sys.stderr)
"""


def run_cli(*argv) -> tuple[int, bool, bool, float, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(__import__("pathlib").Path.home())})
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("RESULT"))
    _, rc, torch_loaded, hf_loaded, seconds = line.split()
    return int(rc), torch_loaded == "True", hf_loaded == "True", float(seconds), proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["verify", "--help"], ["inspect", "--help"],
                                  ["report", "--help"], ["merge", "only-one-arg"], ["nonsense"]])
def test_help_and_usage_errors_import_no_torch(argv):
    rc, torch_loaded, hf_loaded, _, out = run_cli(*argv)
    assert rc == (0 if "--help" in argv else 2)
    assert not torch_loaded and not hf_loaded, out
    if "--help" in argv:
        assert "exit codes: 0 sound" in out
    if argv == ["merge", "--help"]:
        flat = " ".join(out.split())
        assert "--tie-policy" in flat and "input embeddings stay" in flat and "--online" in flat


@pytest.mark.parametrize("argv, expect", [
    (["inspect", "smollm2-135m-instrcut"], "Did you mean 'smollm2-135m-instruct'?"),
    (["inspect", "someorg/not-a-model"], "--online"),
    (["verify", "nonexistent-merged", "--base", "smollm2-135m-instruct"], "nonexistent-merged does not exist"),
    (["merge", "no-such-dir/", "adapter", "out"], "does not exist"),
    (["merge", "smollm2-135m-instruct", "no-such-adapter", "out"], "adapter directory no-such-adapter does not exist"),
])
def test_unknown_names_fail_at_once_offline(argv, expect):
    t = time.perf_counter()
    rc, torch_loaded, _, seconds, out = run_cli(*argv)
    assert rc == 2 and expect in out, out
    assert not torch_loaded and "Retrying" not in out and "Name or service" not in out
    assert seconds < 1.0 and time.perf_counter() - t < 30  # the first: in-process time; the second: a sanity bound
