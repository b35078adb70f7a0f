"""Property-based fuzzing: the corpus reader, the spec loader, and the shard server's API."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


def _settings(examples: int) -> Any:
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same cases on every run: a figure anyone can reproduce
    )


def fuzz_corpus_reader(examples: int = 1000) -> dict[str, Any]:
    """Random lines (JSON or not, good or bad documents) through iter_documents.

    Lenient mode must yield only well-formed documents and count the rest; strict mode may
    raise only CorpusError (a TTTError naming file and line), never anything else.
    """
    from hypothesis import given
    from hypothesis import strategies as st

    from ttt.corpus import iter_documents
    from ttt.errors import TTTError

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    )
    document = st.fixed_dictionaries(
        {},
        optional={"text": st.text(max_size=50) | json_values,
                  "meta": st.dictionaries(st.sampled_from(["pile_set_name", "x"]), json_values)},
    ).map(json.dumps)  # fmt: skip
    line = (
        document | st.text(max_size=60) | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
    )
    counts = {"cases": 0, "documents": 0, "strict_refusals": 0, "unexpected": []}

    @_settings(examples)
    @given(lines=st.lists(line, max_size=8))
    def check(lines: list[str]) -> None:
        counts["cases"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "corpus.jsonl"
            path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
            try:
                for doc in iter_documents([str(path)]):
                    if not doc.text or doc.nbytes != len(doc.text.encode("utf-8")):
                        raise ValueError(f"a malformed document came out: {doc!r}"[:200])
                    counts["documents"] += 1
                try:
                    list(iter_documents([str(path)], strict=True))
                except TTTError:
                    counts["strict_refusals"] += 1
            except Exception as exc:  # noqa: BLE001 - the figure: any other exception is a bug
                counts["unexpected"].append(f"{type(exc).__name__}: {exc}"[:200])

    check()
    return counts


def fuzz_spec_loader(examples: int = 1000) -> dict[str, Any]:
    """Random YAML documents and random field values through loads_spec: SpecError or a run."""
    import yaml
    from hypothesis import given
    from hypothesis import strategies as st

    from ttt.spec import SpecError, TTTRun, loads_spec

    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    fields = {
        "corpus": ["train", "test", "shards", "strict"],
        "retrieval": ["neighbors", "timeoutSeconds", "retries", "allowPartial", "minShards",
                      "deadlineSeconds", "registryHosts", "nothing"],
        "ttt": ["learningRate", "maxLength", "stride", "evalAfter", "method"],
        "eval": ["portion", "workers", "tasks"],
    }  # fmt: skip
    section = st.sampled_from(sorted(fields)).flatmap(
        lambda s: st.tuples(
            st.just(s),
            st.dictionaries(st.sampled_from(fields[s]), scalars | st.lists(scalars, max_size=3)),
        )
    )
    structured = st.lists(section, max_size=4).map(
        lambda parts: yaml.safe_dump(
            {
                "apiVersion": "ttt.dev/v1alpha1",
                "kind": "TTTRun",
                "metadata": {"name": "f"},
                "spec": dict(parts),
            }
        )
    )
    counts = {"cases": 0, "valid": 0, "refused": 0, "unexpected": []}

    @_settings(examples)
    @given(text=structured | st.text(max_size=80))
    def check(text: str) -> None:
        counts["cases"] += 1
        try:
            run = loads_spec(text, "<fuzz>", environ={})
            counts["valid"] += isinstance(run, TTTRun)
        except SpecError as exc:
            if not str(exc).startswith("<fuzz>"):  # the message must name the source
                raise ValueError(f"a SpecError not naming its source: {exc}") from exc
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the figure: any other exception is a bug
            counts["unexpected"].append(f"{type(exc).__name__}: {exc}"[:200])

    check()
    return counts


def fuzz_shard_api(url: str, token: str, examples: int, max_response: int) -> dict[str, Any]:
    """schemathesis cases from the server's own OpenAPI (fetched with the token) against it."""
    import httpx
    import schemathesis
    from hypothesis import given

    headers = {"Authorization": f"Bearer {token}"}
    raw = httpx.get(f"{url}/openapi.json", headers=headers, timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    counts: dict[str, Any] = {"cases": 0, "server_errors": 0, "largest_response": 0}
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @_settings(examples)
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            response = case.call(base_url=url, headers=headers, timeout=30)
            counts["cases"] += 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            counts["server_errors"] += response.status_code >= 500 and response.status_code != 503
            counts["largest_response"] = max(counts["largest_response"], len(response.content))

        check()
    counts["statuses"] = dict(sorted(statuses.items()))
    counts["under_cap"] = counts["largest_response"] <= max_response
    return counts
