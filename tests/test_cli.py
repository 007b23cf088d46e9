"""The ``echofast`` command's own behaviour (the subcommands are tested with their modules)."""

from __future__ import annotations

import pytest

from echofast import cli


def _command_raising(exc: BaseException):
    def run(argv: list[str]) -> int:
        raise exc

    return run


def test_ctrl_c_ends_with_one_line_and_status_130(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "info", (_command_raising(KeyboardInterrupt()), "x"))
    assert cli.main(["info"]) == 130
    err = capsys.readouterr().err
    assert err == "echofast info: interrupted\n"


def test_user_errors_are_one_line_and_other_errors_propagate(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "info", (_command_raising(ValueError("bad --x")), "x"))
    assert cli.main(["info"]) == 1
    assert capsys.readouterr().err == "echofast info: error: ValueError: bad --x\n"
    monkeypatch.setitem(cli.COMMANDS, "info", (_command_raising(RuntimeError("bug")), "x"))
    with pytest.raises(RuntimeError, match="bug"):
        cli.main(["info"])


def test_unknown_command_and_usage(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0
