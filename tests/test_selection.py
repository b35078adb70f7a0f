"""SIFT selection: the same picks as the authors' activeft, diversity among redundant candidates."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from activeft.sift import Retriever

from ttt.index.retrieval import LocalRetriever, Neighbor
from ttt.index.selection import (
    choose_neighbors,
    nearest_select,
    reconstruct_rows,
    sift_select,
    unit_rows,
)
from ttt.spec import SpecError, parse_spec


def _activeft_picks(query: np.ndarray, candidates: np.ndarray, k: int, lam: float) -> list[int]:
    """activeft's SIFT (VTL) over an inner-product index holding exactly the candidates."""
    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(candidates)
    retriever = Retriever(index, llambda=lam, also_query_opposite=False, device=torch.device("cpu"))
    _, picked, _, _ = retriever.search(query[None, :], N=k, K=len(candidates))
    return [int(i) for i in picked]


def _redundant(seed: int, n: int = 20, copies: int = 6, dim: int = 32) -> tuple:
    """Unit candidates where the first `copies` are near-duplicates of one vector."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim))
    base[:copies] = base[0] + 0.01 * rng.normal(size=(copies, dim))
    query = base[0] + 0.6 * base[copies] + 0.4 * base[copies + 1]
    return unit_rows(query).astype(np.float32), unit_rows(base).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0])
def test_sift_picks_the_same_indices_as_activeft(seed, lam):
    query, candidates = _redundant(seed)
    k = 10
    mine = sift_select(query, candidates, k, lam)
    assert mine.indices == _activeft_picks(query, candidates, k, lam)
    # the posterior variance at the query only falls as picks are added
    assert all(a >= b - 1e-9 for a, b in zip(mine.variances, mine.variances[1:], strict=False))


def test_sift_skips_near_duplicates_that_nearest_neighbors_take():
    query, candidates = _redundant(0)
    distances = ((candidates - query) ** 2).sum(axis=1).tolist()
    nn = nearest_select(distances, 4).indices
    sift = sift_select(query, candidates, 4, 0.01).indices
    copies = set(range(6))
    assert set(nn) <= copies  # NN spends all four steps on copies of one document
    # SIFT takes one copy, then the two other directions of the query, which NN never reaches
    assert len(copies & set(sift[:3])) == 1 and set(sift[:3]) - copies == {6, 7}


def test_sift_by_hand_on_two_orthogonal_candidates():
    # q = (1, 1)/sqrt2, candidates e1 and e2: k(q, e_i)^2 = 1/2 for both, a tie -> the first;
    # after e1 (lambda 1): variance 1 - (1/2)/2 = 3/4; e2 is then the only informative one.
    q = np.array([1.0, 1.0]) / np.sqrt(2)
    picks = sift_select(q, np.eye(2), 2, 1.0)
    assert picks.indices == [0, 1]
    assert picks.variances[0] == pytest.approx(0.75)
    assert picks.variances[1] == pytest.approx(0.5)


def test_choose_neighbors_names_its_inputs():
    n = [Neighbor("a", "t", 0.1, 0, 0), Neighbor("b", "t", 0.2, 0, 1)]
    assert [x.id for x in choose_neighbors(n[::-1], None, 1, "nearest", 0.01)[0]] == ["a"]
    with pytest.raises(ValueError, match="SIFT needs the query's and every candidate's vector"):
        choose_neighbors(n, np.ones(2), 1, "sift", 0.01)
    with pytest.raises(ValueError, match="lambda must be > 0"):
        sift_select(np.ones(2), np.eye(2), 1, 0.0)


def test_local_retriever_returns_candidate_vectors_for_flat_and_ivf():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(300, 8)).astype(np.float32)
    flat = faiss.IndexFlatL2(8)
    flat.add(data)
    ivf = faiss.index_factory(8, "IVF4,Flat")
    ivf.train(data)
    ivf.add(data)
    ivf.nprobe = 4
    for index in (flat, ivf):
        np.testing.assert_allclose(reconstruct_rows(index, [5, 7]), data[[5, 7]], rtol=1e-6)

    class Texts:
        def meta(self, row):
            return (f"d{row}", "t")

        def text(self, row):
            return f"text {row}"

    retriever = LocalRetriever(None, [flat], [Texts()], k=5, exclude_identical=False)
    (r,) = retriever.search_vectors(data[:1] + 0.01, k=5, with_vectors=True)
    assert r.query_vector is not None and len(r.neighbors) == 5
    for n in r.neighbors:
        np.testing.assert_allclose(n.vector, data[n.row], rtol=1e-6)
    (plain,) = retriever.search_vectors(data[:1] + 0.01, k=5)
    assert plain.query_vector is None and all(n.vector is None for n in plain.neighbors)
    assert [n.id for n in plain.neighbors] == [n.id for n in r.neighbors]


def _run(retrieval: dict):
    raw = {"apiVersion": "ttt.dev/v1alpha1", "kind": "TTTRun", "metadata": {"name": "s"}}
    return parse_spec({**raw, "spec": {"retrieval": retrieval}}, environ={})


def test_spec_selection_fields():
    r = _run({"neighbors": 50, "selection": "sift"}).spec.retrieval
    assert (r.selection, r.candidate_count, r.sift_lambda) == ("sift", 200, 0.01)
    assert _run({"neighbors": 50}).spec.retrieval.candidate_count == 50  # nearest: k itself
    assert _run({"neighbors": 400, "selection": "sift"}).spec.retrieval.candidate_count == 1000
    with pytest.raises(SpecError, match="candidates \\(10\\) must be >= neighbors \\(50\\)"):
        _run({"neighbors": 50, "selection": "sift", "candidates": 10})
    with pytest.raises(SpecError, match="spec.retrieval.selection"):
        _run({"selection": "random"})
    a = _run({"selection": "sift"})
    assert a.stage_hash("eval") != _run({}).stage_hash("eval")
    assert a.stage_hash("index") == _run({}).stage_hash("index")
    # under nearest selection SIFT's fields change nothing, so they stay out of the hash,
    # and a run's hash is what it was before selection existed
    assert _run({"candidates": 300, "siftLambda": 0.5}).stage_hash("eval") == _run({}).stage_hash(
        "eval"
    )
    import hashlib
    import json

    run = _run({})
    sections = {s: getattr(run.spec, s).model_dump(mode="json") for s in ("corpus", "embedding")}
    sections["index"] = run.spec.index.model_dump(mode="json", exclude={"replicas"})
    from ttt.spec import OPERATIONAL_FIELDS

    operational = set(OPERATIONAL_FIELDS["retrieval"])
    new = {"selection", "candidates", "sift_lambda"}
    sections["retrieval"] = run.spec.retrieval.model_dump(mode="json", exclude=operational | new)
    for s in ("ttt", "eval"):
        sections[s] = getattr(run.spec, s).model_dump(
            mode="json", exclude=set(OPERATIONAL_FIELDS.get(s, ()))
        )
    old = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]
    assert run.stage_hash("eval") == old
