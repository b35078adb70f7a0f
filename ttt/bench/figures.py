"""How every benchmark prints its figures and the command that reproduces them."""

from __future__ import annotations

import shlex
from typing import Any


def print_figures(title: str, figures: dict[str, Any], command: str) -> None:
    """Print a benchmark's figures, one per line, and the command that reproduces them."""
    print(f"== {title}")
    for name, value in figures.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else str(value)
        print(f"  {name:<32} {shown}")
    print(f"  reproduce: {command}")


def reproduce_command(name: str, preset: str, overrides: dict[str, Any]) -> str:
    """`ttt bench NAME --preset P` plus one --flag per argument that was given (kwarg names)."""
    parts = [f"ttt bench {name} --preset {preset}"]
    for key, value in overrides.items():
        if value is True:  # a switch (store_true)
            parts.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
            parts.append(f"--{key.replace('_', '-')} {shlex.quote(str(shown))}")
    return " ".join(parts)
