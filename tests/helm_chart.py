"""The Helm chart rendered by real Helm (helm-python-sdk), as the objects it would create."""

from __future__ import annotations

from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "ttt"
RELEASE, NAMESPACE = "ttt", "ttt"


def render(values: dict | None = None) -> dict[str, str]:
    """The chart's files rendered with `values` as release ttt in namespace ttt."""
    import helm_python as helm  # the callers skip without it (pytest.importorskip)

    return helm.Chart.load(CHART).render(values=values or {}, name=RELEASE, namespace=NAMESPACE)


def objects(rendered: dict[str, str]) -> list[dict]:
    """Every object of a render (NOTES.txt is text, not an object)."""
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]
