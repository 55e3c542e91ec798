"""The viewer's page in headless Chromium (playwright): loads, filters, shows
runs side by side, and shows hostile corpus text as text.

Needs playwright and a Chromium (Debian's ``chromium``, ``$CHROMIUM``, or
``playwright install chromium``): skipped without them, except under CI
(``CI`` set), where a missing browser fails. One browser serves the module.
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil

import numpy as np
import pytest

from tracer import viewer

try:
  from playwright import sync_api
except ImportError:  # the test extra not installed
  sync_api = None

XSS_SCRIPT = "<script>window.__xss = 1</script>"
XSS_IMG = '<img src=x onerror="window.__xss = 2">'
BUCKETS = ("1", "2-3", "11+")
RELATIONS = ("pet", "job", "city")


def _browser_path() -> str | None:
  return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
      "chromium-browser")


def _records() -> dict[str, list[dict]]:
  """Two runs over 30 queries: "trackstar" (predictions but on q29, tail-patch
  on ten, opponents) and "bm25" (no q29, an error on q07). q00's prompt, top
  proponents and a proponent id are hostile markup."""
  rng = np.random.default_rng(1)
  trackstar, bm25 = [], []
  for i in range(30):
    qid = f"q{i:02d}"
    query = {"query_id": qid, "prompt": f"Person {i} has the favourite {RELATIONS[i % 3]}",
             "target": f" Answer{i}", "bucket": BUCKETS[i % 3],
             "relation": RELATIONS[i % 3], "fact_doc_ids": [f"fact-{i}"],
             "prediction": f" Answer{i}" if i % 4 else " Wrong"}
    ids = [f"fact-{i}"] + [f"doc-{j}" for j in rng.choice(100, 4, replace=False)]
    texts = [f"Person {i} has the favourite {RELATIONS[i % 3]} Answer{i}."] + [
        f"Some unrelated text number {j}." for j in range(4)]
    if i == 0:  # hostile markup in texts, an id and the prompt
      texts[0], texts[1] = XSS_SCRIPT, XSS_IMG
      ids[2] = XSS_IMG.replace("2", "3")
      query["prompt"] += " " + XSS_IMG.replace("2", "4")
    if i == 29:
      del query["prediction"]
    scores = sorted(rng.random(5).tolist(), reverse=True)
    t = dict(query, proponent_ids=ids, proponent_scores=scores, proponents=texts,
             opponent_ids=["doc-x"], opponent_scores=[-0.5], opponents=["opposite"])
    if i < 10:
      t["proponent_tail_patch"] = [0.5, 0.1, None, -0.2, 0.05]
    trackstar.append(t)
    if i == 29:
      continue
    b = dict(query, proponent_ids=ids[::-1], proponent_scores=scores,
             proponents=texts[::-1])
    if i == 7:
      b.update(proponent_ids=[], proponent_scores=[], proponents=[],
               error="non-finite gradient: no proponents computed")
    bm25.append(b)
  return {"trackstar": [viewer.normalize_record(r) for r in trackstar],
          "bm25": [viewer.normalize_record(r) for r in bm25]}


RUNS = _records()
QUERIES = RUNS["trackstar"]


def _expected(match) -> int:
  return sum(1 for q in QUERIES if match(q))


def _missing(message: str):
  if os.environ.get("CI"):
    pytest.fail(f"{message}; CI installs it")
  pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
  """Debian's chromium (or $CHROMIUM), else playwright's own download."""
  if sync_api is None:
    _missing("no playwright (pip install playwright)")
  with sync_api.sync_playwright() as p:
    path = _browser_path()
    try:
      b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
    except sync_api.Error as e:
      b = None
      why = str(e).strip().splitlines()[0]
    if b is None:
      _missing(f"no chromium ({why}): apt-get install chromium, set CHROMIUM, "
               "or playwright install chromium")
    yield b
    b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  path = tmp_path_factory.mktemp("report") / "report.html"
  viewer.write_report(str(path), RUNS, title="browser test")
  return path


@pytest.fixture
def page(browser, report):
  """The report opened in a new page; fails the test on any console error or
  uncaught exception."""
  pg = browser.new_page(viewport={"width": 1400, "height": 1000})
  errors = []
  pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
  pg.on("pageerror", lambda e: errors.append(str(e)))
  pg.errors = errors
  pg.goto(report.as_uri())
  pg.wait_for_selector("#list li")
  yield pg
  pg.close()
  assert not errors, errors


def _count(pg) -> int:
  return int(pg.get_attribute("#count", "data-matches"))


def _wait_count(pg, n: int) -> None:
  pg.wait_for_function(
      "n => document.getElementById('count').dataset.matches === String(n)", arg=n,
      timeout=5000)


def test_loads_with_summary_and_full_list(page):
  assert page.errors == []
  assert page.title() == "browser test"
  assert page.inner_text("#count").startswith("30 of 30 queries")
  assert page.locator("#list li").count() == 30
  assert page.locator(".plot svg").count() == 2
  table = page.inner_text("#metrics")
  assert page.locator("table.metrics").count() == 2  # retrieval, tail-patch
  for word in ("trackstar", "bm25", "MRR", "recall@10", "accuracy", "tail-patch@1"):
    assert word in table
  # Per-bucket rows show when asked for.
  rows = page.locator("table.metrics tr.bucket-row")
  assert rows.count() > 0 and not rows.first.is_visible()
  page.check("#per-bucket")
  assert rows.first.is_visible()
  page.uncheck("#per-bucket")


def test_hostile_text_is_shown_as_text(page):
  page.click("#list li[data-index='0']")
  texts = page.locator(".run[data-method='trackstar'] .doc .text").all_inner_texts()
  assert texts[0] == XSS_SCRIPT and texts[1] == XSS_IMG
  ids = page.locator(".run[data-method='trackstar'] .doc .docid").all_inner_texts()
  assert ids[2] == QUERIES[0]["proponent_ids"][2]
  assert page.inner_text("dl.query dd") == QUERIES[0]["prompt"]
  assert QUERIES[0]["prompt"] in page.inner_text("#list li[data-index='0']")
  assert page.evaluate("typeof window.__xss") == "undefined"
  assert page.locator("#browser img, #browser script").count() == 0


def test_query_shows_both_runs_side_by_side(page):
  page.click("#list li[data-index='3']")
  assert page.inner_text("#detail h2") == "q03"
  columns = page.locator(".runs > .run")
  assert [columns.nth(i).get_attribute("data-method") for i in range(2)] == [
      "trackstar", "bm25"]
  boxes = [columns.nth(i).bounding_box() for i in range(2)]
  assert abs(boxes[0]["y"] - boxes[1]["y"]) < 1 and boxes[1]["x"] > boxes[0]["x"] + 200
  ids = [page.locator(f".run[data-method='{m}'] .proponents .docid").all_inner_texts()
         for m in ("trackstar", "bm25")]
  assert ids[0] == QUERIES[3]["proponent_ids"]
  assert ids[1] == QUERIES[3]["proponent_ids"][::-1]
  # The fact document is marked in both, words shared with the query marked.
  assert page.locator(".run[data-method='trackstar'] .doc.fact .docid").all_inner_texts() \
      == ["fact-3"]
  assert page.locator(".run[data-method='bm25'] .doc.fact .docid").all_inner_texts() \
      == ["fact-3"]
  marked = page.locator(".run[data-method='trackstar'] .doc.fact mark").all_inner_texts()
  assert marked == ["Person", "3", "favourite", "pet", "Answer3"]  # not "has", "the"
  assert "tail-patch 0.5000" in page.inner_text(".run[data-method='trackstar'] .doc.fact")
  assert "\u2713 right" in page.inner_text("dl.query")


def test_error_and_missing_query_in_a_run(page):
  page.click("#list li[data-index='7']")
  assert "error: non-finite gradient" in page.inner_text(".run[data-method='bm25']")
  page.evaluate("location.hash = '#q=q29'")
  page.wait_for_function("document.querySelector('#detail h2').textContent === 'q29'")
  assert "not in this run" in page.inner_text(".run[data-method='bm25']")


def test_search_narrows_the_list(page):
  page.fill("#search", "q1")
  want = _expected(lambda q: "q1" in q["query_id"])
  assert want == 10
  _wait_count(page, want)
  assert page.locator("#list li").count() == want
  page.fill("#search", "favourite job")  # every word must match
  _wait_count(page, _expected(lambda q: q["relation"] == "job"))


def test_bucket_relation_and_correctness_filters(page):
  page.select_option("#f-bucket", "2-3")
  _wait_count(page, _expected(lambda q: q["bucket"] == "2-3"))
  page.select_option("#f-correct", "wrong")
  want = _expected(lambda q: q["bucket"] == "2-3" and q.get("prediction_correct") is False)
  _wait_count(page, want)
  assert page.locator("#list li .wrong").count() == want
  assert page.locator("#list li .right").count() == 0
  page.select_option("#f-bucket", "")
  _wait_count(page, _expected(lambda q: q.get("prediction_correct") is False))
  page.select_option("#f-correct", "none")
  _wait_count(page, 1)
  assert page.inner_text("#list li .qid") == "q29"
  page.select_option("#f-correct", "right")
  _wait_count(page, _expected(lambda q: q.get("prediction_correct") is True))
  page.select_option("select[data-field='relation']", "city")
  _wait_count(page, _expected(lambda q: q.get("prediction_correct") is True
                              and q["relation"] == "city"))


def test_hash_and_keyboard_select(browser, report):
  pg = browser.new_page()
  pg.goto(report.as_uri() + "#q=q05")
  assert pg.inner_text("#detail h2") == "q05"
  pg.keyboard.press("j")
  assert pg.inner_text("#detail h2") == "q06"
  assert pg.evaluate("location.hash") == "#q=q06"
  pg.close()


def test_show_more_lists_lazily(browser, tmp_path):
  recs = [viewer.normalize_record({"query_id": f"q{i}", "proponent_ids": ["d"],
                                   "proponent_scores": [1.0]}) for i in range(450)]
  path = tmp_path / "big.html"
  viewer.write_report(str(path), {"m": recs})
  pg = browser.new_page()
  pg.goto(path.as_uri())
  assert pg.locator("#list li").count() == 200
  pg.click("#more")
  assert pg.locator("#list li").count() == 400
  pg.click("#more")
  assert pg.locator("#list li").count() == 450
  assert pg.locator("#more").is_hidden()
  pg.close()


def test_empty_values_tiny_scores_and_an_id_without_a_uri(browser, tmp_path):
  """Three audit findings (stop 82): a bucket or field value "" was the
  "all" option's value (choosing it showed every query); scores below 1e-4
  all read 0.0000; a query id with a lone surrogate threw "URI malformed"
  when selected (no #q= link exists for it)."""
  def record(qid, bucket, relation, scores):
    return viewer.normalize_record({
        "query_id": qid, "bucket": bucket, "relation": relation,
        "proponent_ids": [f"d{i}" for i in range(len(scores))],
        "proponent_scores": scores})
  recs = [record("a", "", "", [3.2e-5, 2.1e-5, -4e-7]),
          record("b", "1", "job", [0.5]), record("c", "1", "pet", [0.25]),
          record("d\ud800", "2-3", "pet", [0.125])]
  path = tmp_path / "odd.html"
  viewer.write_report(str(path), {"m": recs})
  pg = browser.new_page()
  errors = []
  pg.on("pageerror", lambda e: errors.append(str(e)))
  pg.goto(path.as_uri())
  pg.wait_for_selector("#list li")
  _wait_count(pg, 4)
  for select in ("#f-bucket", "select[data-field='relation']"):
    pg.evaluate("""s => {
      const sel = document.querySelector(s);
      sel.selectedIndex = [...sel.options].findIndex((o, i) => i > 0 && o.value === "");
      sel.dispatchEvent(new Event("change"));
    }""", select)
    _wait_count(pg, 1)
    assert pg.inner_text("#list li .qid") == "a"
    pg.evaluate("""s => {
      const sel = document.querySelector(s);
      sel.selectedIndex = 0;
      sel.dispatchEvent(new Event("change"));
    }""", select)
    _wait_count(pg, 4)
  pg.click("#list li[data-index='0']")
  detail = pg.inner_text("#detail")
  assert "3.20e-5" in detail and "2.10e-5" in detail and "-4.00e-7" in detail, detail
  assert "0.5000" not in detail
  for i in range(1, 4):
    pg.click(f"#list li[data-index='{i}']")
  assert pg.inner_text("#detail h2").startswith("d")
  assert pg.evaluate("location.hash") == "#q=c"   # the last id with a link
  pg.close()
  assert not errors, errors


def test_screenshot_is_not_blank(page, tmp_path):
  from PIL import Image  # pillow comes with matplotlib
  page.click("#list li[data-index='0']")
  path = tmp_path / "report.png"
  page.screenshot(path=str(path), full_page=True)
  # Kept for a person to look at: CI can upload TRACER_ARTIFACTS.
  if os.environ.get("TRACER_ARTIFACTS"):
    os.makedirs(os.environ["TRACER_ARTIFACTS"], exist_ok=True)
    path = pathlib.Path(shutil.copy(path, os.environ["TRACER_ARTIFACTS"]))
  print(f"screenshot: {path}")
  image = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
  assert image.shape[0] > 800 and image.shape[1] == 1400
  colours = np.unique(image.reshape(-1, 3)[::7], axis=0)
  assert len(colours) > 50, len(colours)
  assert image.std() > 20, image.std()
