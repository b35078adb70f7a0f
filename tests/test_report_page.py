"""report.html in a real headless browser (Debian's chromium, driven by selenium): it loads from
file:// with no console error and no network, one row per task, and a document's drill-down
shows its neighbors in training order; a screenshot is written to the test's output."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tiny_run import write_corpus

from ttt.corpus import iter_documents
from ttt.eval import select_test_documents
from ttt.report.page import write_page
from ttt.report.page_data import all_ids, first_line, task_documents, titles_for
from ttt.report.summary import summarize
from ttt.spec import parse_spec
from ttt.stages import publish_corpus
from ttt.store import open_store

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """A report page over a real corpus's texts: NN records and SIFT records of the same docs."""
    root = tmp_path_factory.mktemp("page")
    write_corpus(root / "corpus", per_domain_train=4, per_domain_test=2)
    raw = {
        "apiVersion": "ttt.dev/v1alpha1",
        "kind": "TTTRun",
        "metadata": {"name": "nn"},
        "spec": {
            "corpus": {"train": f"{root}/corpus/train.jsonl", "test": f"{root}/corpus/test.jsonl",
                       "shards": 2},
            "ttt": {"evalAfter": [0, 1, 2]},
            "eval": {"portion": 1},
            "storage": {"root": str(root / "store")},
            "metrics": {"enabled": False},
        },
    }  # fmt: skip
    run = parse_spec(raw, environ={})
    store = open_store(run.spec.storage)
    publish_corpus(run, store, progress=False)
    train: dict[str, list] = {}
    for doc in iter_documents([f"{root}/corpus/train.jsonl"]):
        train.setdefault(doc.domain, []).append(doc)

    def record(doc, picks, excluded, partial=False, sift=False):
        ll = -doc.nbytes * 1.0  # bits per byte 1/ln 2 before, then lower after each neighbor
        return {
            "doc": doc.id, "task": doc.domain, "bytes": doc.nbytes, "words": 10, "tokens": 10,
            "loglik": {"0": ll, "1": ll * 0.9, "2": ll * (0.8 if sift else 0.85)},
            "checkpoint_neighbors": {"0": 0, "1": 1, "2": 2}, "spec_hash": "h",
            "neighbors": 2, "neighbor_ids": [d.id for d in picks], "distances": [0.31, 0.42],
            "train_losses": [2.5, 2.25], "excluded": len(excluded),
            "excluded_ids": [d.id for d in excluded], "partial": partial,
            "failed_shards": [1] if partial else [], "selection": "sift" if sift else "nearest",
            "seconds": {"retrieve": 0.25, "train": 1.5, "score": 0.5},
        }  # fmt: skip

    tests = select_test_documents(run, store)
    assert len(tests) == 10  # two of each of the demo corpus's five tasks
    nn = [
        record(d, train[d.domain][:2], train[d.domain][3:], partial=i == 0)
        for i, d in enumerate(tests)
    ]
    sift = [record(d, train[d.domain][1:3], [], sift=True) for d in tests]
    summary = summarize(nn, [0, 1, 2])
    summary.update(run="nn", complete=True)
    titles = titles_for(run, store, all_ids(nn + sift))
    docs = task_documents(nn, titles, [("sift", sift)])
    path = write_page(root / "report.html", summary, docs, ["sift"])
    return path, summary, nn, train


def test_titles_are_first_lines_and_neighbors_keep_training_order(page):
    path, summary, nn, train = page
    html = path.read_text()
    # nothing fetched from anywhere: no src/href, no CSS import or url() (the SVG namespace
    # string is a name, never fetched)
    assert not re.search(r"\b(src|href)\s*=|@import|url\(", html)
    first = nn[0]
    blocks = re.findall(r'<script type="application/json" id="docs-\d+">(.*?)</script>', html)
    assert len(blocks) == len(summary["tasks"])
    views = {v["id"]: v for b in blocks for v in json.loads(b.replace("<\\/", "</"))}
    view = views[first["doc"]]
    assert [n["id"] for n in view["neighbors"]] == first["neighbor_ids"]  # training order
    wanted = train[first["task"]][0]
    assert view["neighbors"][0]["title"] == first_line(wanted.text) != ""
    assert view["neighbors"][1]["bpb_after"] == pytest.approx(0.85 / 0.6931471805599453)
    assert view["partial"] is True and view["excluded"][0]["id"] == first["excluded_ids"][0]
    assert [n["id"] for n in view["compare"]["sift"]["neighbors"]] != first["neighbor_ids"]


@pytest.mark.integration
@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Debian's chromium and chromium-driver (make test installs them)",
)
def test_the_page_in_headless_chromium(page, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path, summary, nn, _ = page
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)  # fmt: skip
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.get(path.as_uri())
        wait = WebDriverWait(driver, 10)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "tr.task"))
        assert len(rows) == len(summary["tasks"])
        assert [r.get_attribute("data-task") for r in rows] == sorted(summary["tasks"])
        # no document is in the DOM before its task is opened (loaded on demand)
        assert driver.find_elements(By.CSS_SELECTOR, "tr.doc") == []
        first = nn[0]
        task = next(r for r in rows if r.get_attribute("data-task") == first["task"])
        task.click()
        doc = wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, f'tr.doc[data-doc="{first["doc"]}"]')
        )
        doc.click()
        drill = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".drill"))
        neighbors = drill.find_elements(By.CSS_SELECTOR, "tr.neighbor")
        assert len(neighbors) == 4  # this run's two picks and SIFT's two, side by side
        assert first["neighbor_ids"][0] in neighbors[0].text and "0.310" in neighbors[0].text
        assert "partial" in drill.text and "excluded" in drill.text
        assert "sift (sift)" in drill.text
        # nothing was fetched: the page's only resource is itself
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
        shot = tmp_path / "report-page.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
    finally:
        driver.quit()
