"""Offline text sources for the demo corpus: each turns files on this machine into documents."""

from __future__ import annotations

import ast
import gzip
import os
import random
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# Our own dependencies (pyproject.toml): their source is on every machine that runs ttt.
GITHUB_PACKAGES = [
    "accelerate", "fastapi", "faiss-cpu", "gguf", "httpx", "kfp", "kubernetes", "matplotlib",
    "minio", "numpy", "prometheus-client", "pydantic", "pydantic-settings", "pyyaml",
    "starlette", "tokenizers", "torch", "tqdm", "transformers", "uvicorn", "zstandard",
]  # fmt: skip
# Debian packages of priority required/important are on every Debian system, docker
# images included; their man pages and copyright files are what a stock machine has.
DEBIAN_PRIORITIES = ("required", "important")
STDLIB_SKIP = {"test", "idlelib", "lib2to3", "ensurepip", "site-packages", "turtledemo",
               "__pycache__", "tkinter", "pydoc_data", "config-3.11-x86_64-linux-gnu"}  # fmt: skip


@dataclass
class Unit:
    """One source file (or generated module): its text is cut into documents, kept together."""

    origin: str  # where it came from, for PROVENANCE.md
    group: str  # package / module family; units of one group are related
    licence: str
    text: str


@dataclass
class Source:
    """What one domain is made of, and how, for the provenance record."""

    domain: str
    source: str
    extraction: str
    units: list[Unit] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def read_text(path: Path) -> str | None:
    """UTF-8 text with normalised newlines, or None for files that are not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except (UnicodeDecodeError, OSError):
        return None


def package_licence(dist: metadata.Distribution) -> str:
    """A package's licence as its metadata states it (SPDX expression, short field, classifier)."""
    meta = dist.metadata
    expression = meta.get("License-Expression")
    if expression:
        return expression.strip()
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or []
                   if c.startswith("License ::")]  # fmt: skip
    short = (meta.get("License") or "").strip()
    if short and "\n" not in short and len(short) < 80 and short.upper() != "UNKNOWN":
        return short
    return " / ".join(classifiers) or "unknown (see the package's licence file)"


def _distribution(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def github_source(max_file_bytes: int = 150_000) -> Source:
    """Python source files of the installed packages that ttt depends on."""
    src = Source(
        "Github",
        "Python source files (*.py) of the installed PyPI packages ttt depends on: "
        + ", ".join(GITHUB_PACKAGES),
        "Files listed in each distribution's RECORD, read as UTF-8; files over "
        f"{max_file_bytes // 1000} KB (generated tables) and under 300 bytes skipped.",
    )
    for name in GITHUB_PACKAGES:
        dist = _distribution(name)
        if dist is None:
            src.missing.append(f"PyPI package {name} is not installed")
            continue
        licence = f"{package_licence(dist)} ({name} {dist.version})"
        for rel in sorted(str(f) for f in dist.files or [] if str(f).endswith(".py")):
            path = Path(dist.locate_file(rel))
            if not path.is_file() or not 300 <= path.stat().st_size <= max_file_bytes:
                continue
            text = read_text(path)
            if text is not None:
                src.units.append(Unit(f"{name}:{rel}", name, licence, text))
    return src


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases) or "builtins.object"
        return f"class {node.name}({bases})"
    return f"{node.name}({ast.unparse(node.args)})"


def _documented(body: list[ast.stmt]) -> list[tuple[ast.AST, str]]:
    """Public functions and classes (and __init__) of a body that have a docstring."""
    found = []
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and (not node.name.startswith("_") or node.name == "__init__"):
                found.append((node, doc))
    return found


def _api_text(module: str, tree: ast.Module) -> str:
    """A pydoc-like plain-text reference of a module from its docstrings (no import)."""
    lines = [f"Help on module {module}:", "", "NAME", f"    {module}", ""]
    doc = ast.get_docstring(tree)
    if doc:
        lines += ["DESCRIPTION", *("    " + ln for ln in doc.splitlines()), ""]
    body: list[str] = []
    for node, node_doc in _documented(tree.body):
        if isinstance(node, ast.ClassDef):
            body += [f"    {_signature(node)}", *("     |  " + ln for ln in node_doc.splitlines())]
            for item, item_doc in _documented(node.body):
                body += ["     |  ", f"     |  {_signature(item)}"]
                body += ["     |      " + ln for ln in item_doc.splitlines()]
        else:
            body += [f"    {_signature(node)}", *("        " + ln for ln in node_doc.splitlines())]
        body.append("")
    if body:
        lines += ["CONTENTS", *body]
    return "\n".join(ln.rstrip() for ln in lines)


def python_docs_source() -> Source:
    """The Python documentation that ships with CPython: help() topics and stdlib docstrings."""
    src = Source(
        "Python Docs",
        "CPython's own documentation shipped with the interpreter: pydoc_data/topics.py (the "
        "Language Reference sections that help() shows) and the docstrings of the pure-Python "
        "standard library modules",
        "Topics: each topic's text as is. Modules: parsed with ast (never imported); the module, "
        "public class, method and function docstrings laid out like pydoc's plain-text help.",
    )
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    licence = "PSF-2.0 (Python documentation and standard library)"
    try:
        from pydoc_data.topics import topics
    except ImportError:
        src.missing.append("pydoc_data.topics is not importable")
        topics = {}
    for key in sorted(topics):
        src.units.append(Unit(f"pydoc_data/topics.py:{key}", "topics", licence, topics[key]))
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.endswith(".py") or name.startswith("_") and name != "__init__.py":
                continue
            text = read_text(path)
            try:
                tree = ast.parse(text or "")
            except SyntaxError:
                continue
            rel = path.relative_to(stdlib).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            module = ".".join(parts)
            if module and not any(p.startswith("_") for p in parts):
                src.units.append(
                    Unit(f"stdlib:{rel}.py", parts[0], licence, _api_text(module, tree))
                )
    return src


def debian_packages() -> dict[str, tuple[str, str]]:
    """Installed Debian packages of the stock priorities: {package: (dpkg .list file, version)}."""
    status = Path("/var/lib/dpkg/status")
    if not status.exists():
        return {}
    found = {}
    pattern = r"^(Package|Priority|Status|Architecture|Version): (.+)$"
    for block in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields = dict(re.findall(pattern, block, re.MULTILINE))
        if fields.get("Priority") in DEBIAN_PRIORITIES and "installed" in fields.get("Status", ""):
            pkg = fields["Package"]
            for candidate in (pkg, f"{pkg}:{fields.get('Architecture', '')}"):
                if Path(f"/var/lib/dpkg/info/{candidate}.list").exists():
                    found[pkg] = (f"/var/lib/dpkg/info/{candidate}.list", fields.get("Version", ""))
    return dict(sorted(found.items()))


FREE_FORM_LICENCES = {
    "LGPL": r"GNU (Lesser|Library) General Public License",
    "GPL": r"GNU General Public License",
    "BSD": r"Redistribution and use in source and binary forms",
    "MIT": r"Permission is hereby granted, free of charge",
    "public domain": r"public domain",
}


def debian_licence(pkg: str) -> str:
    """The main licence of a Debian package from its copyright file (DEP-5 `Files: *`)."""
    path = Path(f"/usr/share/doc/{pkg}/copyright")
    text = read_text(path) if path.exists() else None
    if not text:
        return f"unknown (no /usr/share/doc/{pkg}/copyright)"
    stanzas = re.split(r"\n\s*\n", text)
    licences = [re.search(r"^License:[ \t]*(.+)$", s, re.MULTILINE) for s in stanzas]
    main = [
        m for s, m in zip(stanzas, licences) if m and re.search(r"^Files:\s*\*", s, re.MULTILINE)
    ]
    found = main or [m for m in licences if m]
    if found:
        return f"{found[0].group(1).strip()} ({pkg}, /usr/share/doc/{pkg}/copyright)"
    named = [name for name, rx in FREE_FORM_LICENCES.items() if re.search(rx, text, re.IGNORECASE)]
    return f"{' / '.join(named) or 'unstated'} ({pkg}, free-form /usr/share/doc/{pkg}/copyright)"


def render_man(path: Path) -> str | None:
    """A man page as a terminal shows it: groff to UTF-8 text, no overstrike, no hyphens."""
    source = gzip.decompress(path.read_bytes())
    if source.lstrip().startswith(b".so "):
        return None  # an alias of another page
    cmd = ["groff", "-Tutf8", "-mandoc", "-t", "-rHY=0", "-rLL=78n", "-P-cbou"]
    env = {"LC_ALL": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    done = subprocess.run(cmd, input=source, capture_output=True, env=env, check=False)
    if done.returncode != 0:
        return None
    text = done.stdout.decode("utf-8", errors="strict")
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def man_pages_source(select: int, seed: str) -> Source:
    """English man pages of Debian's required/important packages, rendered with groff."""
    src = Source(
        "Man Pages",
        "English manual pages (/usr/share/man/man[1-8]/*.gz) of the installed Debian "
        f"packages of priority {' and '.join(DEBIAN_PRIORITIES)} (present on every Debian)",
        "gunzip, `groff -Tutf8 -mandoc -t -rHY=0 -rLL=78n -P-cbou` (LC_ALL=C.UTF-8), runs of "
        f"blank lines squeezed; .so aliases skipped; {select} pages drawn at random.",
    )
    if shutil.which("groff") is None:
        src.missing.append("groff is not installed (Debian package groff-base)")
        return src
    pages = []
    for pkg, (listing, _) in debian_packages().items():
        for line in Path(listing).read_text(encoding="utf-8").splitlines():
            path = Path(line)
            is_page = re.fullmatch(r"/usr/share/man/man[1-8]/[^/]+\.gz", line)
            if is_page and path.is_file() and not path.is_symlink():
                pages.append((pkg, path))
    if not pages:
        src.missing.append("no man pages of required/important Debian packages found")
    random.Random(seed).shuffle(pages)
    chosen = sorted(pages[:select])
    # groff runs as a subprocess: threads keep every core busy, map() keeps the order.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        texts = list(pool.map(render_man, (path for _, path in chosen)))
    for (pkg, path), text in zip(chosen, texts):
        if text:
            src.units.append(Unit(str(path), pkg, debian_licence(pkg), text))
    return src


def licenses_source() -> Source:
    """Licence texts: Debian's common licences, copyright files, and licences of PyPI packages."""
    src = Source(
        "Licenses",
        "/usr/share/common-licenses/*, CPython's LICENSE.txt, /usr/share/doc/<pkg>/copyright of Debian's "
        "required/important packages, and the licence files (LICENSE*, COPYING*, NOTICE*, "
        "dist-info/licenses/*) of the PyPI packages whose code makes the Github domain",
        "Read as UTF-8; exact duplicates (after collapsing whitespace) dropped, first one in "
        "sorted order kept.",
    )
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        for path in sorted(common.iterdir()):
            if path.is_file() and not path.is_symlink() and (text := read_text(path)):
                note = f"{path.name} licence text (verbatim copies permitted by its own terms)"
                src.units.append(Unit(str(path), "common-licenses", note, text))
    else:
        src.missing.append("/usr/share/common-licenses does not exist")
    python_licence = Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if text := read_text(python_licence):
        src.units.append(Unit(str(python_licence), "python", "PSF-2.0 (CPython)", text))
    packages = debian_packages()
    if not packages:
        src.missing.append("no dpkg database (/var/lib/dpkg/status): no Debian copyright files")
    for pkg in packages:
        path = Path(f"/usr/share/doc/{pkg}/copyright")
        if path.is_file() and (text := read_text(path)):
            src.units.append(Unit(str(path), "debian-copyright", debian_licence(pkg), text))
    pattern = re.compile(r"(^|/)(licen[cs]es?/.+|(LICEN[CS]E|COPYING|NOTICE)[^/]*)$", re.IGNORECASE)
    for name in GITHUB_PACKAGES:
        dist = _distribution(name)
        if dist is None:
            src.missing.append(f"PyPI package {name} is not installed")
            continue
        for rel in sorted(str(f) for f in dist.files or []):
            if ".dist-info/" in rel and pattern.search(rel) and not rel.endswith(".py"):
                path = Path(dist.locate_file(rel))
                if path.is_file() and (text := read_text(path)):
                    licence = f"{package_licence(dist)} ({name} {dist.version})"
                    src.units.append(Unit(f"{name}:{rel}", "pypi-licenses", licence, text))
    seen, unique = set(), []
    for unit in src.units:
        key = " ".join(unit.text.split())
        if key and key not in seen:
            seen.add(key)
            unique.append(unit)
    src.units = unique
    return src
