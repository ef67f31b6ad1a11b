"""Shell completion for ``asyncstage``, generated from its argument parser.

``asyncstage completion bash`` and ``asyncstage completion zsh`` print a script; install it
once with::

    asyncstage completion bash > ~/.local/share/bash-completion/completions/asyncstage
    asyncstage completion zsh > ~/.zfunc/_asyncstage   # or: eval "$(asyncstage completion zsh)"

It completes commands, actions and options, and server and volume names. Names come from a
small cache (``~/.asyncstage/cache/servers`` and ``volumes``, one name a line) that every
command which opened a manager rewrites on its way out: completing costs no cloud call and
no Python start, at the price of showing the names as of the last command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["NAME_KINDS", "bash_script", "cache_dir", "write_names", "zsh_script"]

NAME_KINDS = {
    **dict.fromkeys(("servers", "ssh", "shell"), "servers"),
    **dict.fromkeys(("volumes", "snapshot", "dd"), "volumes"),
    "rsync": "both",
}
"""Which names each command's positional arguments take."""


def cache_dir() -> Path:
    """Where the name cache lives: ``$ASYNCSTAGE_CACHE`` or ``~/.asyncstage/cache``."""
    return Path(os.environ.get("ASYNCSTAGE_CACHE") or "~/.asyncstage/cache").expanduser()


def write_names(kind: str, names: Iterable[str]) -> None:
    """Record the current server or volume names for completion (best effort)."""
    directory = cache_dir()
    with contextlib.suppress(OSError):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = directory / f".{kind}.tmp"
        tmp.write_text("".join(f"{n}\n" for n in sorted(set(names))))
        tmp.replace(directory / kind)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """All option strings, and those that take a value."""
    every: list[str] = []
    valued: list[str] = []
    for action in parser._actions:
        every += action.option_strings
        if action.option_strings and action.nargs != 0:
            valued += action.option_strings
    return sorted(every), sorted(valued)


def _choices(parser: argparse.ArgumentParser) -> list[str]:
    """The choices of the first positional argument (the action), if any."""
    for action in parser._actions:
        if not action.option_strings and action.choices:
            return [str(c) for c in action.choices]
    return []


def _case_arms(parser: argparse.ArgumentParser) -> list[str]:
    arms = []
    for name, sub in sorted(_subcommands(parser).items()):
        options, _ = _options(sub)
        kind = NAME_KINDS.get(name, "")
        words = " ".join([*_choices(sub), *options])
        arms.append(f'        {name}) words="{words}"; kind="{kind}";;')
    return arms


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The bash completion script for ``parser`` (the ``asyncstage`` parser)."""
    global_options, valued = _options(parser)
    commands = " ".join(sorted(_subcommands(parser)))
    lines = [
        "# asyncstage completion for bash: asyncstage completion bash > "
        "~/.local/share/bash-completion/completions/asyncstage",
        "_asyncstage_names() {",
        '    local f="${ASYNCSTAGE_CACHE:-$HOME/.asyncstage/cache}/$1"',
        '    [ -r "$f" ] && cat -- "$f"',
        "}",
        "_asyncstage() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local cmd="" words="" kind="" i',
        '    case "$prev" in',
        f"        {'|'.join(valued)}) return 0;;",
        "    esac",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        f"            {'|'.join(valued)}) ((i++));;",
        "            -*) ;;",
        '            *) cmd="${COMP_WORDS[i]}"; break;;',
        "        esac",
        "    done",
        '    case "$cmd" in',
        f'        "") words="{commands} {" ".join(global_options)}";;',
        *_case_arms(parser),
        "    esac",
        '    case "$kind" in',
        '        servers) words="$words $(_asyncstage_names servers)";;',
        '        volumes) words="$words $(_asyncstage_names volumes)";;',
        "        both) words=\"$words $(_asyncstage_names servers | sed 's/$/:/')"
        " $(_asyncstage_names volumes | sed 's/$/:/')\";;",
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        '    if [ "${#COMPREPLY[@]}" = 1 ] && [[ ${COMPREPLY[0]} == *: ]]; then',
        "        compopt -o nospace 2>/dev/null  # NAME: goes on with a path",
        "    fi",
        "}",
        "complete -o default -F _asyncstage asyncstage",
    ]
    return "\n".join(lines) + "\n"


def zsh_script(parser: argparse.ArgumentParser) -> str:
    """The zsh completion script: the bash one, through zsh's ``bashcompinit``."""
    return (
        "#compdef asyncstage\n"
        "# asyncstage completion for zsh: asyncstage completion zsh > ~/.zfunc/_asyncstage\n"
        "autoload -U +X bashcompinit && bashcompinit\n" + bash_script(parser)
    )
