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
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"derive {__version__} (derive-gradients)"


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
    from derive import loader

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
