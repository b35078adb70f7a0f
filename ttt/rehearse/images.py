"""What a pod's image gives its process (ENV, WORKDIR, USER, ENTRYPOINT, CMD), read from images/."""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ttt.errors import TTTError

IMAGES = Path(__file__).resolve().parents[2] / "images"
# The images install the project in /opt/venv; here it is this interpreter's environment.
IMAGE_VENV = "/opt/venv"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(TTTError, ValueError):
    """A pod names an image that images/ does not build."""


@dataclass
class Image:
    """The runtime facts of one built image (its final stage, with its base's)."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: tuple[int, int] | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _env_pairs(args: str, env: dict[str, str]) -> dict[str, str]:
    """ENV k=v k2=v2 (values may use $VAR of the image so far); the legacy `ENV k v` too."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs = {}
    for word in words:
        key, _, value = word.partition("=")
        pairs[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: {**env, **pairs}.get(m[1], ""), value)
    return pairs


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else ["/bin/sh", "-c", args]


def _dockerfile(stage: str) -> Path:
    path = IMAGES / stage / "Dockerfile"
    if not path.is_file():
        raise ImageError(f"no {path} builds image ttt-{stage}")
    return path


def read_image(stage: str, _seen: tuple[str, ...] = ()) -> Image:
    """The image `ttt-<stage>` as images/<stage>/Dockerfile builds it (a `FROM ${BASE_IMAGE}`
    stage starts from the ARG's default, itself an image of images/)."""
    path = _dockerfile(stage)
    image = Image(name=f"ttt-{stage}")
    args: dict[str, str] = {}
    for word, rest in _instructions(path.read_text()):
        if word == "ARG":
            key, _, default = rest.partition("=")
            args.setdefault(key, default.strip('"'))
        elif word == "FROM":
            source = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], ""), rest.split()[0])
            base = re.fullmatch(r"(?:.*/)?ttt-(\w+)(:[\w.-]+)?", source)
            if base and base[1] not in _seen + (stage,):
                image = read_image(base[1], (*_seen, stage))
                image.name = f"ttt-{stage}"
            else:  # an outside base (python, CUDA): a fresh stage, the default PATH
                image = Image(name=f"ttt-{stage}", env={"PATH": DEFAULT_PATH})
        elif word == "ENV":
            image.env.update(_env_pairs(rest, image.env))
        elif word == "WORKDIR":
            image.workdir = rest
        elif word == "USER":
            uid, _, gid = rest.partition(":")
            image.user = (int(uid), int(gid or uid)) if uid.isdigit() else None
        elif word == "ENTRYPOINT":
            image.entrypoint, image.cmd = _exec_form(rest), []
        elif word == "CMD":
            image.cmd = _exec_form(rest)
    image.env = {k: v.replace(IMAGE_VENV, sys.prefix) for k, v in image.env.items()}
    return image


def image_for(reference: str) -> Image:
    """The image a pod names (`[registry/]ttt-<stage>:<tag>[@digest]`): this checkout's build
    of it, whatever the tag (the rehearsal runs the code it is given)."""
    name = reference.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    if not name.startswith("ttt-"):
        raise ImageError(f"image {reference!r} is not one of the project's (ttt-<stage>)")
    return read_image(name.removeprefix("ttt-"))
