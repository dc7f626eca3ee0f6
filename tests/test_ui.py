"""The web UI (task=serve) over a real curate run: HTTP behaviour (range
requests, errors as messages, read-only), and a real headless Chromium
session (search, playback, filters, no console errors)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import lance
import pytest
from hydra import compose, initialize_config_dir

from engine.cli import CONFIG_DIR
from engine.index.task import run as run_index
from engine.serve.app import BackgroundServer, Filters, make_app, parse_range


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


@pytest.fixture(scope="module")
def served(embedded_output, tmp_path_factory):
    """The curate run, indexed, served from a background thread."""
    out = tmp_path_factory.mktemp("served") / "out"
    shutil.copytree(embedded_output, out)
    run_index(config("task=index", f"output={out}"))
    before = snapshot(out)
    with BackgroundServer(make_app(str(out), page_size=24)) as url:
        yield out, url
    assert snapshot(out) == before, "the UI wrote to the output"


@pytest.fixture(scope="module")
def clips(served):
    out, _ = served
    ds = lance.dataset(out / "clips.lance")
    return ds.to_table(columns=["clip_id", "video_id", "source_uri", "error"], with_row_id=True).to_pylist()


def test_defaults_bind_to_localhost():
    cfg = config("task=serve", "output=x")
    assert cfg.serve.host == "127.0.0.1" and cfg.task.steps == ["serve"]


def test_filters_become_sql():
    f = Filters(passed="yes", duplicate="hide", status="ok", video="v'1", where="end_s > 2",
                ranges={"aesthetic_score": ("4", ""), "motion_global_mean": ("", "0.5")})
    cols = ("passed", "duplicate", "error", "video_id")
    assert f.sql(cols) == ("passed = true AND duplicate IS NOT TRUE AND error IS NULL AND video_id = 'v''1' AND "
                           "aesthetic_score >= 4.0 AND motion_global_mean <= 0.5 AND (end_s > 2)")
    assert Filters(status="all").sql(cols) is None
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=900-", 1000) == (900, 999)
    assert parse_range("bytes=-100", 1000) == (900, 999)
    assert parse_range(None, 1000) is None
    with pytest.raises(ValueError):
        parse_range("bytes=2000-", 1000)


def test_media_is_served_with_range_requests(served, clips):
    out, url = served
    clip = next(c for c in clips if c["error"] is None)
    whole = lance.dataset(out / "clips.lance").read_blobs("mp4", ids=[clip["_rowid"]])[0][1]
    status, headers, body = get(f"{url}/media/{clip['clip_id']}/clip.mp4")
    assert status == 200 and body == whole and headers["accept-ranges"] == "bytes"
    assert headers["content-type"] == "video/mp4"
    status, headers, body = get(f"{url}/media/{clip['clip_id']}/clip.mp4", {"Range": "bytes=100-1099"})
    assert status == 206 and body == whole[100:1100]
    assert headers["content-range"] == f"bytes 100-1099/{len(whole)}"
    status, _, body = get(f"{url}/media/{clip['clip_id']}/clip.mp4", {"Range": "bytes=-64"})
    assert status == 206 and body == whole[-64:]
    status, headers, _ = get(f"{url}/media/{clip['clip_id']}/clip.mp4", {"Range": f"bytes={len(whole) + 5}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(whole)}"
    status, headers, body = get(f"{url}/media/{clip['clip_id']}/preview.webp")
    assert status == 200 and body[:4] == b"RIFF" and body[8:12] == b"WEBP"
    status, _, body = get(f"{url}/media/no-such-clip/clip.mp4")
    assert status == 404 and b"no clip" in body


def test_pages_show_errors_as_messages(served):
    _, url = served
    status, _, body = get(f"{url}/clip/no-such-clip")
    assert status == 404 and b"no clip with clip_id" in body and b"Traceback" not in body
    status, _, body = get(f"{url}/?where=passed%20AND%20AND")
    assert status == 400 and b"invalid where filter" in body and b"Traceback" not in body
    status, _, body = get(f"{url}/?min_motion_global_mean=abc")
    assert status == 400 and b"is not a number" in body
    status, _, body = get(f"{url}/?like=no-such-clip")
    assert status == 404 and b"no clip with clip_id" in body
    status, _, body = get(f"{url}/api/search?where=nope%20%3E%201")
    assert status == 400 and "invalid where filter" in json.loads(body)["error"]
    status, _, body = get(f"{url}/no/such/page")
    assert status == 404 and b"Traceback" not in body


def test_api_search_and_overview(served, clips):
    _, url = served
    status, _, body = get(f"{url}/api/search?status=all")
    data = json.loads(body)
    assert status == 200 and data["total"] == len(clips) == 6
    one_video = clips[0]["video_id"]
    data = json.loads(get(f"{url}/api/search?video={one_video}")[2])
    assert {r["video_id"] for r in data["results"]} == {one_video} and 0 < data["total"] < 6
    data = json.loads(get(f"{url}/api/search?q=a%20clip%20of%20a%20dog")[2])
    assert len(data["results"]) == 6 and all(r["score"] is not None for r in data["results"])
    like = json.loads(get(f"{url}/api/search?like={clips[0]['clip_id']}")[2])
    assert len(like["results"]) == 5 and clips[0]["clip_id"] not in {r["clip_id"] for r in like["results"]}
    overview = json.loads(get(f"{url}/api/overview")[2])
    assert overview["summary"]["clips"] == 6 and overview["summary"]["videos_failed"] == 1
    assert [h["name"] for h in overview["histograms"]][:1] == ["clip length (s)"]
    assert sum(b["count"] for b in overview["histograms"][0]["bins"]) == 6
    status, _, page = get(f"{url}/overview")
    assert status == 200 and b"corrupt.mp4" in page and b"hours in" in page and b"<svg" in page


def test_browse_only_table_without_embeddings(embedded_output, tmp_path):
    """A clone of the run with the embedding column dropped: browse and
    filters work; vector queries explain why they cannot."""
    src = lance.dataset(embedded_output / "clips.lance")
    clone = src.shallow_clone(str(tmp_path / "clips.lance"), src.version)
    clone.drop_columns(["embedding"])
    with BackgroundServer(make_app(str(tmp_path / "clips.lance"))) as url:
        status, _, body = get(f"{url}/")
        assert status == 200 and body.count(b'class="card"') == 6 and b"text search needs embeddings" in body
        status, _, body = get(f"{url}/?like=anything")
        assert status == 400 and b"no embedding column" in body
        status, _, body = get(f"{url}/?q=dog")
        assert status == 400 and b"needs embeddings" in body
        status, _, body = get(f"{url}/overview")
        assert status == 200 and b"No summary.json" in body


# ------------------------------------------------------------ real browser
def browser_unavailable(reason: str) -> None:
    """Skip, saying why; but fail in CI where `make browser` installed the browser (REELSIFT_BROWSER=required):
    there a missing browser is a broken set-up, not a machine without one."""
    if os.environ.get("CI") == "true" and os.environ.get("REELSIFT_BROWSER") == "required":
        pytest.fail(f"CI installed Chromium for this test, yet {reason}")
    pytest.skip(reason)


def chromium_driver(tmp_path: Path):
    """Headless Debian Chromium through its chromedriver, or skip saying why."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        browser_unavailable("headless Chromium is not installed (make test installs Debian's chromium and "
                            "chromium-driver with apt-get where it can)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser_unavailable("selenium is not installed (pip install -e .[dev])")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver_bin), options=options)
    except Exception as exc:  # noqa: BLE001 - any start failure is an environment problem
        browser_unavailable(f"headless Chromium did not start: {type(exc).__name__}: {str(exc).splitlines()[0]}")


@pytest.mark.slow
def test_in_a_real_browser(served, clips, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    _, url = served
    driver = chromium_driver(tmp_path)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        # Submitting a form loads a new page: an element found on the old one may go stale between finding it
        # and reading it, which only means "not yet".
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))

        def previews_loaded() -> bool:
            return bool(driver.execute_script(
                "const imgs = [...document.querySelectorAll('#gallery img')];"
                "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"))

        # A text search returns a gallery of previews.
        driver.get(url + "/")
        box = driver.find_element(By.ID, "q")
        box.send_keys("a busy street at night")
        driver.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
        wait.until(lambda d: "Top" in d.find_element(By.CSS_SELECTOR, ".status").text)
        wait.until(lambda d: previews_loaded())
        cards = driver.find_elements(By.CSS_SELECTOR, "#gallery .card")
        assert len(cards) == 6
        assert all(c.find_element(By.CSS_SELECTOR, ".tag.score") for c in cards)
        driver.save_screenshot(str(shots / "search.png"))

        # A clip plays from the blob column.
        cards[0].find_element(By.CSS_SELECTOR, "a.thumb").click()
        wait.until(lambda d: d.find_elements(By.ID, "player"))
        driver.execute_script("const v = document.getElementById('player'); v.muted = true; v.play();")
        wait.until(lambda d: d.execute_script("return document.getElementById('player').readyState") >= 2)
        assert driver.execute_script("return document.getElementById('player').duration") > 1
        wait.until(lambda d: d.execute_script("return document.getElementById('player').currentTime") > 0)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#similar .card")) == 5
        driver.save_screenshot(str(shots / "clip.png"))

        # Filters change the gallery: one source video.
        driver.get(url + "/")
        wait.until(lambda d: previews_loaded())
        all_ids = {c.get_attribute("data-clip-id") for c in driver.find_elements(By.CSS_SELECTOR, "#gallery .card")}
        assert len(all_ids) == 6
        video = clips[-1]["video_id"]
        Select(driver.find_element(By.ID, "f-video")).select_by_value(video)  # submits on change
        wait.until(lambda d: f"video={video}" in d.current_url)
        wait.until(lambda d: previews_loaded())
        some_ids = {c.get_attribute("data-clip-id") for c in driver.find_elements(By.CSS_SELECTOR, "#gallery .card")}
        assert some_ids == {c["clip_id"] for c in clips if c["video_id"] == video} and some_ids < all_ids
        driver.save_screenshot(str(shots / "filtered.png"))

        # The overview renders its histograms.
        driver.get(url + "/overview")
        assert driver.find_elements(By.CSS_SELECTOR, "#histograms svg rect")
        driver.save_screenshot(str(shots / "overview.png"))

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

        # A bad query is a message on the page, not a stack trace.
        driver.get(url + "/?where=passed%20AND%20AND")
        message = driver.find_element(By.ID, "error").text
        assert "invalid where filter" in message and "Traceback" not in driver.page_source
        driver.save_screenshot(str(shots / "error.png"))
    finally:
        driver.quit()
    assert all((shots / n).stat().st_size > 1000 for n in ("search.png", "clip.png", "filtered.png", "overview.png"))
    print(f"screenshots: {shots}")
    os.environ.setdefault("REELSIFT_UI_SCREENSHOTS", str(shots))


def test_an_output_in_an_object_store_is_served_with_its_run(served, local_s3):
    """serve on s3:// reads summary.json and videos.lance with the config's credentials too."""
    out, _ = served
    client, opts = local_s3
    client.create_bucket(Bucket="served")
    for path in [out / "summary.json", *(out / "clips.lance").rglob("*"), *(out / "videos.lance").rglob("*")]:
        if path.is_file():  # a Lance table is its files: copied as they are
            client.put_object(Bucket="served", Key=f"run/{path.relative_to(out)}", Body=path.read_bytes())
    with BackgroundServer(make_app("s3://served/run", storage_options=opts)) as url:
        overview = json.loads(get(f"{url}/api/overview")[2])
        status, _, page = get(f"{url}/overview")
    assert overview["summary"]["clips"] == 6 and overview["summary"]["videos_failed"] == 1
    assert len(overview["videos"]) == lance.dataset(out / "videos.lance").count_rows()
    assert status == 200 and b"corrupt.mp4" in page
