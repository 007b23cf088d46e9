"""The ``echofast`` command's own behaviour (the subcommands are tested with their modules)."""

from __future__ import annotations

import pytest

from echofast import cli
from echofast.errors import ConfigError, NonFiniteError


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


# every subcommand runs its module's entry point with the arguments after the command name
ENTRY_POINTS = {
    "info": "echofast.info.main",
    "privacy-filter": "echofast.privacy.cli.main_privacy_filter",
    "privacy-audit": "echofast.privacy.cli.main_privacy_audit",
    "phantom": "echofast.data.phantom.main_phantom",
    "encode": "echofast.data.encode.main_encode",
    "train": "echofast.train.main_train",
    "metrics": "echofast.eval.fidelity.main_metrics",
    "evaluate": "echofast.eval.downstream.main_evaluate",
    "report": "echofast.eval.report.main_report",
    "bench": "echofast.benchmark.main_bench",
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_each_command_runs_its_entry_point_with_the_remaining_arguments(monkeypatch, name):
    calls = []

    def entry(argv):
        calls.append(list(argv))
        return 7

    monkeypatch.setattr(ENTRY_POINTS[name], entry)
    assert cli.main([name, "--x", name, "-h"]) == 7
    assert calls == [["--x", name, "-h"]]


def test_usage_lists_every_command_with_its_summary(capsys):
    expected = set(ENTRY_POINTS) | {"generate", "merge"}
    assert set(cli.COMMANDS) == expected
    for argv in (["-h"], ["--help"]):
        assert cli.main(argv) == 0
        out, err = capsys.readouterr()
        assert err == "" and out.startswith("usage: echofast <command> [options]")
        listed = {line.split()[0]: " ".join(line.split()[1:]) for line in out.splitlines()[3:-1]}
        assert listed == {name: summary for name, (_, summary) in cli.COMMANDS.items()}


def test_without_arguments_the_command_line_is_read(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["echofast", "nope", "--x"])
    assert cli.main() == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["echofast"])
    assert cli.main() == 2
    assert capsys.readouterr().out.startswith("usage: echofast")


@pytest.mark.parametrize(
    "exc,line",
    [
        (OSError(28, "No space left on device"), "OSError: [Errno 28] No space left on device"),
        (FileNotFoundError(2, "No such file", "w/vae"), "FileNotFoundError: [Errno 2] No such"),
        (NonFiniteError("sample 3 is not finite at step 2"), "NonFiniteError: sample 3 is not"),
        (ConfigError("config key 'x': value 1"), "ConfigError: config key 'x': value 1"),
    ],
)
def test_file_system_and_echofast_errors_end_with_one_line_and_status_1(
    monkeypatch, capsys, exc, line
):
    monkeypatch.setitem(cli.COMMANDS, "encode", (_command_raising(exc), "x"))
    assert cli.main(["encode"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"echofast encode: error: {line}") and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    from echofast import __version__

    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == f"echofast {__version__}\n"


def test_warnings_are_one_line_naming_the_command(monkeypatch, capsys):
    """A library warning during a command (e.g. a resumed job's other batch size) is one line,
    not Python's file, line number and source line; the handler is restored afterwards."""
    import warnings

    def warns(argv):
        warnings.warn("records batch size 8, this run uses 4", UserWarning, stacklevel=2)
        return 0

    before = warnings.showwarning
    monkeypatch.setitem(cli.COMMANDS, "generate", (warns, "x"))
    assert cli.main(["generate"]) == 0
    assert capsys.readouterr().err == (
        "echofast generate: warning: records batch size 8, this run uses 4\n"
    )
    assert warnings.showwarning is before


class _Unreadable:
    """A dataset whose items raise as a bad video does (module level: workers may spawn)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise self.exc


@pytest.mark.parametrize(
    "exc",
    [ConfigError("/d/Videos/v1.avi: cannot decode\nsecond line"), ValueError("bad value: 3")],
)
def test_an_error_in_a_data_loader_worker_is_its_own_message(monkeypatch, capsys, exc):
    """torch re-raises a worker's error with the worker's traceback as its message: the
    command prints the original message only."""
    import torch

    def run(argv: list[str]) -> int:
        loader = torch.utils.data.DataLoader(_Unreadable(exc), num_workers=1)
        next(iter(loader))
        return 0

    monkeypatch.setitem(cli.COMMANDS, "encode", (run, "x"))
    assert cli.main(["encode"]) == 1
    err = capsys.readouterr().err
    assert err == f"echofast encode: error: {type(exc).__name__}: {exc}\n"
    assert cli.error_text(exc) == str(exc)


class _Chained:
    """A dataset whose items raise while handling an earlier error of the same type."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        try:
            raise ValueError("first: fps is 0")
        except ValueError as err:
            raise ValueError("/d/Videos/v1.avi: cannot decode") from err


def test_a_worker_error_raised_while_handling_another_is_the_last_message(monkeypatch, capsys):
    import torch

    def run(argv: list[str]) -> int:
        next(iter(torch.utils.data.DataLoader(_Chained(), num_workers=1)))
        return 0

    monkeypatch.setitem(cli.COMMANDS, "encode", (run, "x"))
    assert cli.main(["encode"]) == 1
    assert capsys.readouterr().err == (
        "echofast encode: error: ValueError: /d/Videos/v1.avi: cannot decode\n"
    )
