"""The command line as a user meets it: usage, --version, subcommands, standard input, -q, and the
progress line on a terminal."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from derive import __version__, cli

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
[file]
title = "two steps"

[symbols]
x = "real"

[[derivation]]
id = "square"

[[derivation.chain]]
id = "expand"
lines = ["(x + 1)^2", "x^2 + 2*x + 1"]

[[derivation]]
id = "exp"

[[derivation.chain]]
id = "product"
lines = ["exp(x)*exp(x)", "exp(2*x)"]
"""

BAD = GOOD.replace('"x^2 + 2*x + 1"', '"x^2 + x + 1"')


def _derive(*args, stdin=None, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "derive", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_no_arguments_prints_usage_on_stderr_and_exits_2(capsys):
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: derive") and "verify" in err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"derive {__version__} (derive-gradients)"
    proc = _derive("--version")  # from a fresh process: without importing SymPy
    assert proc.returncode == 0 and proc.stdout.strip() == f"derive {__version__} (derive-gradients)"
    proc = subprocess.run([sys.executable, "-c", "import sys; from derive import cli; cli.main(['--version']); "
                           "print('sympy' in sys.modules)"], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.split()[-1] == "False"


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("verify", "codegen", "docs", "accuracy", "bench"):
        assert name in out


@pytest.mark.parametrize("name, prog", [("codegen", "derive codegen"), ("docs", "derive docs"),
                                        ("accuracy", "derive accuracy"), ("bench", "derive bench")])
def test_subcommands_forward_their_own_options(name, prog, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog}")


def test_unknown_command_and_bad_option_exit_2():
    proc = _derive("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and proc.stdout == ""
    proc = _derive("verify", "--step-timeout", "-1", "x.toml")
    assert proc.returncode == 2 and "--step-timeout" in proc.stderr
    proc = _derive("verify", "--step-timeout", "nan", "x.toml")
    assert proc.returncode == 2 and "--step-timeout" in proc.stderr


def test_a_file_from_standard_input(tmp_path):
    proc = _derive("verify", "-", stdin=GOOD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "<stdin>" in proc.stdout and "2 checks: 2 proved" in proc.stdout
    proc = _derive("verify", "-", stdin=BAD)
    assert proc.returncode == 1 and "REFUTED" in proc.stdout and "<stdin>" in proc.stdout
    proc = _derive("verify", "-", stdin="[file]\ntitle = \n")
    assert proc.returncode == 2 and "<stdin>" in proc.stderr and "Traceback" not in proc.stderr
    proc = _derive("verify", "-", "-", stdin=GOOD)
    assert proc.returncode == 2 and "only once" in proc.stderr


def test_standard_input_over_the_size_limit_is_refused_without_reading_it_all(tmp_path):
    from derive.language import loader

    big = "# " + "x" * (loader.MAX_FILE_BYTES + 10) + "\n"
    proc = _derive("verify", "-", stdin=big)
    assert proc.returncode == 2 and "<stdin>" in proc.stderr and str(loader.MAX_FILE_BYTES) in proc.stderr


def test_quiet_prints_only_failures_and_the_summary(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    full = _derive("verify", str(good), str(bad))
    quiet = _derive("verify", "-q", str(good), str(bad))
    assert full.returncode == quiet.returncode == 1
    assert "product" in full.stdout and "product" not in quiet.stdout  # a proved check: only in the full report
    assert "REFUTED" in quiet.stdout and "counterexample" in quiet.stdout  # the failure, with its point
    assert "result: FAILED" in quiet.stdout and "4 checks" in quiet.stdout
    assert len(quiet.stdout.splitlines()) < len(full.stdout.splitlines())


def test_progress_line_on_a_terminal_and_none_on_a_pipe(tmp_path):
    f = tmp_path / "good.toml"
    f.write_text(GOOD)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "derive", "verify", str(f)], stdout=subprocess.PIPE, stderr=slave,
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its side
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    out = proc.communicate(timeout=60)[0].decode()
    os.close(master)
    assert proc.returncode == 0, out
    text = seen.decode(errors="replace")
    assert "\r" in text and "square" in text and "of 2)" in text, text
    assert text.endswith("\r"), "the progress line is erased at the end"
    assert "result: OK" in out and "\r" not in out  # the report itself goes to stdout, unchanged
    piped = _derive("verify", str(f))
    assert "of 2)" not in piped.stderr and piped.returncode == 0


def test_verify_options_are_verify_s_own(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify", "--bogus", "x.toml"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: derive verify") and "--bogus" in err


def test_output_paths_are_checked_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    t0 = time.monotonic()
    for args, needle in ((("codegen", "--out", str(afile)), "is a file, not a folder"),
                         (("docs", "--out", str(afile)), "is a file"),
                         (("docs", "--out", str(theirs)), "not written by derive docs"),
                         (("bench", "--json", str(afile / "x.json")), "cannot write there")):
        proc = _derive(*args)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert time.monotonic() - t0 < 60, "an output path was checked only after the work"
    assert (theirs / "notes.txt").read_text() == "mine" and afile.read_text() == "not a folder"


def test_codegen_check_names_missing_files_and_the_command_to_run(tmp_path):
    proc = _derive("codegen", "--check", "--out", str(tmp_path / "gen"))
    assert proc.returncode == 1
    assert "focal_kernels.c is missing" in proc.stderr and f"derive codegen --out {tmp_path / 'gen'}" in proc.stderr
