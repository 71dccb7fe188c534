"""explore: the endpoints through Flask's test client (map data, neighbours vs a brute-force cosine search, an upload's
embedding vs crlf extract's row, the probe's class, refused requests), the map cache, the CLI's one-line errors, the
static map of visualize, the benchmark's smoke mode, and the real page in headless Chromium."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_run
from inprocess import run_crlf
from PIL import Image

from crlf.commands.evaluate import linear_eval
from crlf.commands.explore import open_space
from crlf.commands.visualize import visualize
from crlf.engine import sources
from crlf.engine.checkpoint import read_tensors
from crlf.engine.projection import fit_unit_square, project
from crlf.options import DataSettings
from crlf.settings import ExploreSettings, LinearEvalSettings, VisualizeSettings

K = 5
LIMIT = 100  # digits per split: 200 points


@pytest.fixture(autouse=True)
def _no_crlf_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("CRLF_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def run(reference_run, tmp_path_factory):
    """A copy of the session's reference run (8 px digits) with a linear-eval result and probe in it."""
    path = tmp_path_factory.mktemp("explore") / "run"
    copy_run(reference_run.path, path)
    linear_eval(LinearEvalSettings(ckpt=path / "encoder.safetensors", data="digits", limit=150, device="cpu",
                                   probe_epochs=5))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def space(run):
    return open_space(ExploreSettings(run=run, limit=LIMIT, projection="pca", device="cpu"))


@pytest.fixture(scope="module")
def app(space):
    from crlf.explore_app import create_app

    return create_app(space, neighbors=K, max_upload_bytes=20_000)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def server(app):
    """The real werkzeug server of `crlf explore` on a free loopback port, serving `app`."""
    from crlf.explore_app import bind, start

    server = start(app, bind("127.0.0.1", 0), "127.0.0.1")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to 127.0.0.1:port; the status, headers (lower-case names) and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered before reading it all: its answer is still there to read
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status.split()[1]), headers, body


def png(path: Path | None = None, size=(20, 30), seed=0) -> bytes:
    """A random RGB PNG (written to `path` too when given)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def brute_force(x: np.ndarray, q: np.ndarray, exclude: int | None = None) -> np.ndarray:
    """Cosine similarities of every row of x to q (the excluded row at -inf)."""
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = z @ (q / np.linalg.norm(q))
    if exclude is not None:
        sims[exclude] = -np.inf
    return sims


def check_neighbours(found: list[dict], sims: np.ndarray, k: int) -> None:
    """The k best rows of a brute-force search, best first (ties may swap rows of equal similarity)."""
    assert len(found) == k
    best = np.sort(sims)[::-1][:k]
    assert np.allclose([n["similarity"] for n in found], best, atol=2e-5)
    assert np.allclose([sims[n["index"]] for n in found], best, atol=2e-5)
    assert len({n["index"] for n in found}) == k


def test_map_data_labels_ids_and_the_cached_map(run, space, client, monkeypatch, caplog):
    info = client.get("/api/info").get_json()
    assert info["count"] == 2 * LIMIT and info["dim"] == 512 and info["projection"] == "pca"
    assert info["labelled"] and info["uploads"] and info["probe"] and info["neighbors"] == K
    points = client.get("/api/points").get_json()
    options = DataSettings(data="digits", image_size=8, limit=LIMIT)
    train, test = sources.load(options, "train"), sources.load(options, "test")
    assert points["labels"] == train.labels.tolist() + test.labels.tolist()
    assert points["ids"] == train.ids + test.ids and points["ids"][-1].startswith("test/")
    # the rows are extract's, the map is the PCA of them scaled into the unit square
    import crlf

    extracted = crlf.embed(run / "encoder.safetensors", data="digits", split="test", limit=LIMIT, device="cpu").x
    assert torch.allclose(space.x[LIMIT:], extracted, atol=1e-5)
    expected = fit_unit_square(project(space.x.numpy(), "pca")[0])
    assert np.allclose(np.c_[points["x"], points["y"]], expected, atol=2e-5)
    assert 0 <= min(points["x"] + points["y"]) and max(points["x"] + points["y"]) <= 1
    cached = sorted(p.name for p in (run / "explore").iterdir())
    assert [n.split("-")[0] for n in cached] == ["embeddings", "map"] and cached[1].startswith("map-pca-")
    # a second start reads both from the cache: neither the encoder nor the projection runs
    import crlf.commands.explore as explore_command
    import crlf.engine.explore as explore

    monkeypatch.setattr(explore_command, "_project", lambda *a: pytest.fail("the map was computed again"))
    monkeypatch.setattr(explore.Embedder, "images", lambda *a: pytest.fail("the images were embedded again"))
    again = open_space(ExploreSettings(run=run, limit=LIMIT, projection="pca", device="cpu"))
    assert np.array_equal(again.coords, space.coords) and torch.equal(again.x, space.x)
    thumb = client.get("/api/thumb/3")
    assert thumb.status_code == 200 and thumb.mimetype == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumb.data))), space.images[3].permute(1, 2, 0).numpy())
    # a damaged cached array (one value changed, its checksum kept) is computed again, with one warning
    monkeypatch.undo()
    path = next((run / "explore").glob("map-*.npz"))
    with np.load(path) as found:
        value, digest = found["value"].copy(), found["sha256"]
    value[0, 0] += 1.0
    np.savez(path, value=value, sha256=digest)
    with caplog.at_level("WARNING", logger="crlf"):
        again = open_space(ExploreSettings(run=run, limit=LIMIT, projection="pca", device="cpu"))
    assert np.array_equal(again.coords, space.coords)
    assert sum("does not match its checksum" in r.getMessage() for r in caplog.records) == 1


def test_neighbours_equal_a_brute_force_cosine_search(space, client):
    x = space.x.numpy().astype(np.float64)
    for i in (0, 17, 2 * LIMIT - 1):
        body = client.get(f"/api/neighbors/{i}").get_json()
        assert body["index"] == i and body["id"] == space.ids[i]
        check_neighbours(body["neighbors"], brute_force(x, x[i], exclude=i), K)
        assert all(n["label"] == int(space.labels[n["index"]]) for n in body["neighbors"])
    assert len(client.get("/api/neighbors/3?k=12").get_json()["neighbors"]) == 12
    assert len(client.get("/api/neighbors/3?k=100").get_json()["neighbors"]) == 100  # the most a request may ask


def test_an_upload_is_embedded_like_extract_and_classified_by_the_probe(run, space, client, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    image = png(folder / "query.png")
    r = run_crlf("extract", "--ckpt", run / "encoder.safetensors", "--data", "folder", "--data-dir", folder,
                 "--out", tmp_path / "e.npy", "--device", "cpu")  # fmt: skip
    assert r.returncode == 0, r.stderr
    row = np.load(tmp_path / "e.npy")[0]
    body = client.post(f"/api/embed?k={K}", data={"image": (io.BytesIO(image), "query.png")}).get_json()
    assert np.allclose(body["embedding"], row, atol=1e-5)
    check_neighbours(body["neighbors"], brute_force(space.x.numpy().astype(np.float64), row.astype(np.float64)), K)
    # the probe linear-eval saved: it reproduces linear-eval's top-1, and names the upload's class
    tensors, meta = read_tensors(run / "linear_eval_probe.safetensors")
    w, b = tensors["weight"].double(), tensors["bias"].double()
    result = json.loads((run / "linear_eval.json").read_text())
    assert json.loads(meta["class_names"]) == result["class_names"] and meta["format"] == "crlf-linear-probe"
    import crlf

    test = crlf.embed(run / "encoder.safetensors", data="digits", split="test", limit=150, device="cpu")
    top1 = 100 * float(((test.x.double() @ w.T + b).argmax(1) == test.labels).double().mean())
    assert top1 == pytest.approx(result["top1"], abs=1e-9)
    p = torch.softmax(torch.from_numpy(row).double() @ w.T + b, 0)
    assert body["prediction"]["label"] == int(p.argmax()) and body["prediction"]["class"] == str(int(p.argmax()))
    assert body["prediction"]["confidence"] == pytest.approx(float(p.max()), abs=1e-5)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_requests_are_refused_with_a_message(client, monkeypatch):
    def refused(response, code, fragment):
        body = response.get_json()
        assert response.status_code == code and fragment in body["error"], (response.status_code, body)

    refused(client.post("/api/embed", data={"image": (io.BytesIO(b"x" * 30_000), "big.png")}), 413, "larger than")
    refused(client.post("/api/embed", data={"image": (io.BytesIO(b"hello"), "notes.txt")}), 400, "not an image")
    refused(client.post("/api/embed", data={"image": (io.BytesIO(b"hello"), "fake.png")}), 400, "not an image")
    refused(client.post("/api/embed", data={}), 400, "form field 'image'")
    refused(client.post("/api/embed?k=many", data={"image": (io.BytesIO(png()), "a.png")}), 400, "whole number")
    for k in (0, -3, 101, 100000):  # refused with the range, not quietly clamped
        refused(client.get(f"/api/neighbors/3?k={k}"), 400, f"k must be between 1 and 100, not {k}")
    refused(client.post("/api/embed?k=101", data={"image": (io.BytesIO(png()), "a.png")}), 400, "between 1 and 100")
    refused(client.get("/api/search?q=" + "3" * 201), 400, "at most 200 characters")  # not cut to 200
    refused(client.delete("/api/info"), 405, "not allowed")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 600 pixels: over the limit (Pillow refuses over twice it)
    refused(client.post("/api/embed", data={"image": (io.BytesIO(png()), "a.png")}), 400, "20x30 pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    refused(client.post("/api/embed", data={"image": (io.BytesIO(png()), "a.png")}), 400, "decompression bomb")
    monkeypatch.undo()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **kw: opened.append(str(f)) or real_open(f, *a, **kw))
    for path in ("/api/thumb/../../../../etc/passwd", "/api/thumb/..%2f..%2f..%2fetc%2fpasswd",
                 "/static/../../../etc/passwd", "/static/explore.html", "/explore.html", "/api/thumb/-1",
                 "/api/thumb/%2fetc%2fpasswd", "/api/thumb/200", "/api/neighbors/1e3"):  # fmt: skip
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.get_json() and b"root:" not in r.data, path
    assert not [f for f in opened if "passwd" in f or f.endswith(".html")], opened


def test_errors_of_the_http_server_itself_are_json(server):
    """Requests werkzeug's server refuses before Flask sees them answer {"error": ...}, not an HTML page."""
    host = b"Host: 127.0.0.1\r\n"
    for request, code, fragment in [
        (b"GET /api/search?q=" + b"a" * 100_000 + b" HTTP/1.1\r\n" + host + b"\r\n", 414, "request line"),
        (b"GET /api/info HTTP/1.1\r\n" + host + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n", 431, "header"),
        (b"GET /api/info HTTP/1.1\r\n" + host + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
         431, "headers"),
        (b"\x16\x03\x01 garbage that is no request line\r\n\r\n", 400, "not an http request"),
        (b"GET /api/info HTTP/1.x\r\n" + host + b"\r\n", 400, "not an http request"),
        (b"GET /api/info HTTP/7.0\r\n" + host + b"\r\n", 505, "http version"),
        (b"GET /api/nothing HTTP/1.1\r\n" + host + b"\r\n", 404, "not found"),
    ]:  # fmt: skip
        status, headers, body = raw_request(server.port, request)
        assert status == code and headers["content-type"] == "application/json", (request[:40], status, headers)
        error = json.loads(body)["error"]
        assert fragment in error.lower() and "<" not in error and "\n" not in error, (request[:40], error)
        assert int(headers["content-length"]) == len(body)
    status, _, body = raw_request(server.port, b"GET /api/info HTTP/1.1\r\n" + host + b"\r\n")
    assert status == 200 and json.loads(body)["count"] == 2 * LIMIT  # the server still serves


def test_only_the_servers_own_host_names_are_answered(server, space):
    """A page of another site that rebinds its name to 127.0.0.1 (DNS rebinding) cannot read the map or the images."""
    from crlf.explore_app import allowed_hosts, create_app

    def get(path, host):
        header = b"" if host is None else b"Host: " + host.encode() + b"\r\n"
        return raw_request(server.port, f"GET {path} HTTP/1.1\r\n".encode() + header + b"\r\n")

    for path in ("/", "/api/points", "/api/thumb/0", "/api/neighbors/0", "/nothing"):
        for host in ("evil.example", f"evil.example:{server.port}", "localhost.evil.example", "127.0.0.1.nip.io",
                     "[::2]", "local host", ""):  # fmt: skip
            status, headers, body = get(path, host)
            assert status == 403 and headers["content-type"] == "application/json", (path, host, status)
            assert "--allow-host" in json.loads(body)["error"], (path, host)
            assert b"PNG" not in body and b'"ids"' not in body
    for host in ("127.0.0.1", f"127.0.0.1:{server.port}", "localhost", f"LocalHost:{server.port}", "[::1]",
                 f"[::1]:{server.port}", None):  # fmt: skip
        assert get("/api/info", host)[0] == 200, host
    # --host and --allow-host widen it; * answers any name
    hosts = allowed_hosts("0.0.0.0", ["Photos.LAN", "[fe80::1]"])
    assert hosts == {"127.0.0.1", "localhost", "::1", "0.0.0.0", "photos.lan", "fe80::1"}
    wide = create_app(space, neighbors=K, hosts=hosts).test_client()
    assert wide.get("/api/info", base_url="http://photos.lan:8765/").status_code == 200
    assert wide.get("/api/info", base_url="http://[fe80::1]:8765/").status_code == 200
    refused = wide.get("/api/info", base_url="http://other.lan/")
    assert refused.status_code == 403 and "'other.lan'" in refused.get_json()["error"]
    anything = create_app(space, neighbors=K, hosts=allowed_hosts("127.0.0.1", ["*"])).test_client()
    assert anything.get("/api/info", base_url="http://other.lan/").status_code == 200
    with pytest.raises(Exception, match="allow_host"):
        ExploreSettings(emb="x.npy", allow_host=["http://photos.lan/"])
    given = ExploreSettings(emb="x.npy", allow_host=["Photos.lan", "[::1]", "*"]).allow_host
    assert given == ["photos.lan", "::1", "*"]


def test_search_by_class_name_or_file_name(space, client):
    found = client.get("/api/search?q=TEST/1").get_json()["indices"]
    assert found == [i for i, name in enumerate(space.ids) if "test/1" in name] and found
    threes = client.get("/api/search?q=3").get_json()["indices"]
    assert threes == [i for i in range(len(space)) if space.labels[i] == 3 or "3" in space.ids[i]]
    assert client.get("/api/search?q=%20").get_json()["indices"] == []


def test_embeddings_file_with_its_images_and_an_unwritable_run(run, space, tmp_path, monkeypatch, caplog):
    out = tmp_path / "test.npz"
    r = run_crlf("extract", "--ckpt", run / "encoder.safetensors", "--data", "digits", "--split", "test",
                 "--limit", LIMIT, "--device", "cpu", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    emb = open_space(ExploreSettings(emb=out, limit=LIMIT, projection="pca"))  # images: the file's provenance
    assert torch.equal(emb.x, space.x[LIMIT:]) and emb.ids == space.ids[LIMIT:] and emb.embedder is None
    with pytest.raises(Exception, match="give the data options"):
        open_space(ExploreSettings(emb=out, projection="pca"))  # all 359 test digits: not the file's 100
    # a run directory that cannot be written: computed without caching, after a warning
    copy = tmp_path / "ro"
    copy_run(run, copy, ignore=shutil.ignore_patterns("explore"))
    import crlf.engine.explore as explore

    def refuse(path, write):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(explore, "atomic_write", refuse)
    with caplog.at_level("WARNING", logger="crlf"):
        again = open_space(ExploreSettings(run=copy, limit=LIMIT, projection="pca", device="cpu"))
    assert torch.allclose(again.x, space.x, atol=1e-5) and not list((copy / "explore").glob("*.np[yz]"))
    assert any("cannot cache" in r.getMessage() for r in caplog.records)


def test_cli_errors_are_one_line(run, monkeypatch):
    def one_error(r, fragment):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
        assert lines[-1].startswith("error: ") and fragment in lines[-1], r.stderr

    free = ("--port", "0")  # any free port: a crlf explore of the user's on the default 8765 must not matter
    one_error(run_crlf("explore", *free), "needs --run DIR")
    one_error(run_crlf("explore", "--run", run / "nope", *free), "does not exist")
    one_error(run_crlf("explore", "--run", run, "--ckpt", run / "encoder.safetensors", *free), "--run DIR alone")
    one_error(run_crlf("explore", "--run", run, "--allow-host", "http://photos.lan:80/", *free), "not a host name")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        one_error(run_crlf("explore", "--run", run, "--port", taken.getsockname()[1]), "is in use")
    monkeypatch.setitem(sys.modules, "flask", None)
    monkeypatch.delitem(sys.modules, "crlf.explore_app", raising=False)
    monkeypatch.delattr(sys.modules["crlf"], "explore_app", raising=False)  # as if never imported
    one_error(run_crlf("explore", "--run", run, *free), "crlf explore needs Flask: pip install 'crlf[explore]'")


def test_visualize_writes_a_static_map_with_thumbnails(run, tmp_path):
    from crlf.engine.mapview import SPRITE, static_map

    copy = tmp_path / "run"
    copy_run(run, copy)
    result = visualize(VisualizeSettings(run=[copy], kind=["pca"], max_points=60, device="cpu"))
    page = Path(result["index"]).read_text()
    assert 'id="crlf-map"' in page and "function crlfMap" in page and f'"sprite": "{SPRITE}"' in page
    with Image.open(copy / "figures" / SPRITE) as sheet:
        assert sheet.size == (8 * 8, 8 * 8)  # 60 tiles of 8 px, 8 columns
    images = np.zeros((3, 8, 8, 3), np.uint8)
    html = static_map(tmp_path, np.eye(3, 2), None, [], ["</script><b>x", "a", "b"], images, "tsne")
    assert "</script><b>" not in html and "t-SNE of 3 embeddings" in html


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    script = Path(__file__).parents[1] / "benchmarks" / "explore.py"
    r = subprocess.run([sys.executable, script, "--smoke", "--json", out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["points"] == 2000 and set(result["rows"]) >= {"neighbors", "points_json"}
    assert all(0 < row["median_ms"] <= row["max_ms"] for row in result["rows"].values())
    assert "neighbors" in r.stdout and "ms" in r.stdout


def _chromium() -> str | None:
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)  # fmt: skip


@pytest.mark.skipif(_chromium() is None, reason="no chromium (.ci/run installs Debian's)")
def test_the_page_in_headless_chromium(run, server, tmp_path):
    from playwright.sync_api import sync_playwright

    copy = tmp_path / "run"
    copy_run(run, copy)
    index = visualize(VisualizeSettings(run=[copy], kind=["pca"], max_points=60, device="cpu"))["index"]
    query = tmp_path / "query.png"
    png(query, seed=3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(f"http://127.0.0.1:{server.port}/")
        page.wait_for_function(f"window.crlfExplore.ready && window.crlfExplore.map.drawn === {2 * LIMIT}")
        coloured = page.evaluate("""() => {
            const c = document.getElementById('map'), d = c.getContext('2d').getImageData(0, 0, c.width,
                c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250) n++;
            return n; }""")  # fmt: skip
        assert coloured > 2 * LIMIT  # the points are on the canvas
        x, y = page.evaluate("window.crlfExplore.map.screenPosition(7)")
        page.mouse.move(x, y)
        page.wait_for_selector("#tip img", state="visible")
        page.mouse.click(x, y)
        page.wait_for_function(f"document.querySelectorAll('#neighbors li').length === {K}")
        assert "similarity" in page.inner_text("#neighbors")
        page.set_input_files("#file", str(query))
        page.wait_for_function("document.getElementById('prediction').textContent.includes('linear probe')")
        assert page.locator("#upload-neighbors li").count() == K
        predicted = page.inner_text("#prediction").split(": ")[1].split(" (")[0]
        assert predicted in [str(c) for c in range(10)]
        # the upload's result replaces the clicked point's: no point 7 above it, nor its ring on the map
        assert page.inner_text("#selected") == "click a point of the map" and page.locator("#neighbors li").count() == 0
        assert page.evaluate("window.crlfExplore.map.selected") == -1
        page.locator("#upload-neighbors li").first.click()  # a neighbour of the upload: now the query
        page.wait_for_function(f"document.querySelectorAll('#neighbors li').length === {K}")
        assert page.locator("#upload-neighbors li").count() == 0 and page.inner_text("#prediction") == ""
        page.goto(Path(index).as_uri())  # visualize's page: the same map, no server
        page.wait_for_function("window.crlfStaticMap && window.crlfStaticMap.drawn === 60")
        page.locator("#crlf-map").scroll_into_view_if_needed()  # below the figures
        x, y = page.evaluate("window.crlfStaticMap.screenPosition(5)")
        page.mouse.move(x, y)
        page.wait_for_selector("#crlf-tip", state="visible")
        assert "px" in page.evaluate("document.getElementById('crlf-tile').style.backgroundPosition")
        browser.close()
