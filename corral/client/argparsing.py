"""The CLI's argparse machinery: errors in our words, help as wide as the
terminal, and subcommands whose parsers are made only when chosen (a
one-shot command should not pay for every command's options).
`corral.client.parser` says what the commands are.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from corral.client.errors import EXIT_USAGE


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, descriptions and epilogs as written, as wide as the
    terminal: found as `shutil.get_terminal_size` finds it, without importing
    shutil (argparse makes a formatter for every option it adds, and shutil
    brings the compression modules, milliseconds of every command)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _terminal_columns() - 2  # as argparse leaves a margin
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (ValueError, OSError):
        return 80


class Parser(argparse.ArgumentParser):
    """argparse, but its errors look like ours: one line, `corral: error:
    ...`, naming the help to read, and status 2; and `check`, if given,
    says what is wrong with a parsed line beyond argparse's rules."""

    def __init__(
        self,
        *args: Any,
        check: Callable[[argparse.Namespace], str | None] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self._check_line = check

    def add_commands(self, **kwargs: Any) -> Commands:
        """`add_subparsers`, whose commands' parsers are made when needed."""
        commands = self.add_subparsers(action=Commands, **kwargs)
        assert isinstance(commands, Commands)
        return commands

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"corral: error: {message}; see '{self.prog} --help'\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        """Parse, and check what argparse cannot see, before anything
        connects: every mistake is said by the command it is in."""
        parsed, extras = self.parse_known_args(args, namespace)
        command = self._command(parsed)
        if extras:
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        problem = self._check_line(parsed) if self._check_line is not None else None
        if problem:
            command.error(problem)
        return parsed

    def _command(self, parsed: argparse.Namespace) -> Parser:
        """The (sub)parser of the command `parsed` is for: its help is the one to read."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
                if isinstance(chosen, Parser):
                    return chosen._command(parsed)
        return self


if TYPE_CHECKING:
    _SubParsersAction = argparse._SubParsersAction[Any]  # generic only in typeshed
else:
    _SubParsersAction = argparse._SubParsersAction


class _Later:
    """A command's parser, not made yet: see `Commands`."""

    def __init__(self, make: Callable[[], Parser]) -> None:
        self.make = make


class Commands(_SubParsersAction):
    """argparse's subcommands, but a command's parser is made, with its
    options, when the command is chosen (argparse makes each at once):
    making every command's parser costs a one-shot command more than
    parsing its own line does. `--help` lists the commands without them."""

    def add_command(
        self, name: str, *, help: str, options: Callable[[Parser], None], **kwargs: Any
    ) -> None:
        """Command `name`, listed with `help`: a `Parser(**kwargs)` given
        `options(parser)` once it is chosen."""

        def make() -> Parser:
            parser = Parser(prog=f"{self._prog_prefix} {name}", **kwargs)
            options(parser)
            return parser

        self._choices_actions.append(self._ChoicesPseudoAction(name, (), help))
        self._name_parser_map[name] = _Later(make)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        later = self._name_parser_map.get(values[0])
        if isinstance(later, _Later):
            self._name_parser_map[values[0]] = later.make()
        super().__call__(parser, namespace, values, option_string)


__all__ = ["Commands", "Parser"]
