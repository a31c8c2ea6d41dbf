"""Malformed derivation files: exit code 2 and one clear message naming file, derivation, chain, line."""
import pytest

from derive.cli import main

GOOD_HEAD = '[symbols]\nx = "real"\n[[derivation]]\nid = "d1"\n[[derivation.chain]]\nid = "c1"\n'


@pytest.mark.parametrize("body, expected", [
    ("this is [not toml", "invalid TOML"),
    (GOOD_HEAD + 'lines = ["x", "y"]\n', "[derivation 'd1', chain 'c1', line 1]: expression: undefined name 'y'"),
    (GOOD_HEAD + 'lines = ["x"]\n', "a chain needs at least two lines"),
    (GOOD_HEAD + 'lines = ["x", "(x + 1"]\n', "unbalanced parentheses"),
    (GOOD_HEAD + 'lines = ["x", "x +* 2"]\n', "line 1]"),
    (GOOD_HEAD + 'lines = ["x", "hello world"]\n', "undefined name 'hello'"),
    (GOOD_HEAD + 'lines = ["x", "x == x"]\n', "is a comparison"),
    ('[symbols]\nx = "(1, 0)"\n[[derivation]]\nid = "d"\n[[derivation.chain]]\nlines = ["x", "x"]\n',
     "contradicts itself"),
    ('[symbols]\nx = "{}"\n[[derivation]]\nid = "d"\n[[derivation.chain]]\nlines = ["x", "x"]\n', "empty set"),
    ('[symbols]\nx = "reals"\n[[derivation]]\nid = "d"\n[[derivation.chain]]\nlines = ["x", "x"]\n',
     "cannot read domain"),
    ('[symbols]\n__class__ = "real"\n[[derivation]]\nid = "d"\n[[derivation.chain]]\nlines = ["1", "1"]\n',
     "invalid name"),
    ('[definitions]\na = "b + 1"\nb = "2"\n[[derivation]]\nid = "d"\n[[derivation.chain]]\nlines = ["a", "3"]\n',
     "defined later"),
    ('[symbols]\nx = "real"\n', "has no [[derivation]]"),
    (GOOD_HEAD + 'lines = ["x", "x"]\nbogus = 1\n', "unknown key 'bogus'"),
    (GOOD_HEAD + 'lines = ["x", {expr = "x", erratum = {corrected = "x"}}]\n', "erratum needs why"),
    (GOOD_HEAD + 'lines = ["x", "' + "(" * 400 + "x" + ")" * 400 + '"]\n', "nested deeper"),
    (GOOD_HEAD + 'lines = ["x", "D(x, 2)"]\n', "must be a declared symbol"),
    (GOOD_HEAD + 'lines = [1, 2]\n', "a line is an expression string"),
])
def test_malformed_file_exit_2(tmp_path, capsys, body, expected):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    rc = main(["verify", str(p)])
    cap = capsys.readouterr()
    assert rc == 2
    assert str(p) in cap.err and expected in cap.err, cap.err
    assert "Traceback" not in cap.err + cap.out
    assert cap.err.count("\n") == 1  # one message


def test_non_utf8(tmp_path, capsys):
    p = tmp_path / "bin.toml"
    p.write_bytes(b'[symbols]\nx = "r\xff\xfeal"\n')
    assert main(["verify", str(p)]) == 2
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and str(p) + ":2" in err


def test_missing_file_and_directory(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_line_numbers_in_messages(tmp_path, capsys):
    p = tmp_path / "l.toml"
    p.write_text(GOOD_HEAD + 'lines = [\n  "x",\n  "x + zz",\n]\n')
    assert main(["verify", str(p)]) == 2
    assert f"{p}:9 " in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["verify", "--timeout", "-1"])
    assert info.value.code == 2
    assert "must be a positive" in capsys.readouterr().err
