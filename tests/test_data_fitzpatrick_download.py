"""The Fitzpatrick downloader against a real HTTP server on 127.0.0.1."""

import collections
import http.server
import io
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medleak.data_utils import datasets, fitzpatrick_download
from medleak.errors import MedleakError
from tests import layouts

ROOT = Path(__file__).resolve().parents[1]


def _image_bytes(fmt, value):
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


class _Server:
    """Serves /ok.jpg, /png.png, /flaky.jpg (503 once, then an image), /missing.jpg (404),
    /html.jpg (200 but HTML) and counts requests per path."""

    def __init__(self):
        self.hits = collections.Counter()
        jpeg, png = _image_bytes("JPEG", 200), _image_bytes("PNG", 50)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 — http.server's API
                server.hits[self.path] += 1
                if self.path == "/ok.jpg" or (self.path == "/flaky.jpg" and server.hits[self.path] > 1):
                    self._reply(200, jpeg, "image/jpeg")
                elif self.path == "/png.png":
                    self._reply(200, png, "image/png")
                elif self.path == "/flaky.jpg":
                    self._reply(503, b"busy", "text/plain")
                elif self.path == "/html.jpg":
                    self._reply(200, b"<html>moved</html>", "text/html")
                else:
                    self._reply(404, b"not found", "text/plain")

            def _reply(self, code, body, content_type):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _write_csv(root, server):
    """A Fitzpatrick-layout CSV whose url column points at the test server."""
    layouts.write_fitzpatrick(root, n_patients=5)
    for jpg in root.glob("*.jpg"):
        jpg.unlink()  # the layout writes images; here the downloader must fetch them
    df = pd.read_csv(root / "fitzpatrick17k.csv")
    df["url"] = [f"{server.url}/{p}" for p in ("ok.jpg", "png.png", "flaky.jpg", "missing.jpg", "html.jpg")]
    df.to_csv(root / "fitzpatrick17k.csv", index=False)
    return df


def test_download_retries_verifies_records_and_resumes(tmp_path, server, capsys):
    df = _write_csv(tmp_path, server)
    original_csv = (tmp_path / "fitzpatrick17k.csv").read_bytes()
    summary = fitzpatrick_download.download_all(tmp_path / "fitzpatrick17k.csv", tmp_path, num_workers=3,
                                                retries=2, timeout=5, backoff=0.01)
    assert (summary["downloaded"], summary["present"], summary["failed"]) == (3, 0, 2)
    assert "3 of 5 images ready" in capsys.readouterr().out
    assert (tmp_path / "fitzpatrick17k.csv").read_bytes() == original_csv  # never overwritten

    out = pd.read_csv(tmp_path / "fitzpatrick17k_downloaded.csv")
    assert list(out["download_success"]) == [True, True, True, False, False]
    assert out["download_error"][3] == "HTTP 404" and "not an image" in out["download_error"][4]
    for md5, ok in zip(df["md5hash"], out["download_success"]):
        path = tmp_path / f"{md5}.jpg"
        assert path.is_file() == ok
        if ok:
            with Image.open(path) as image:
                assert image.format == "JPEG"  # the PNG payload was re-encoded
    assert server.hits["/flaky.jpg"] == 2  # 503 retried once, then succeeded
    assert server.hits["/missing.jpg"] == 1  # 404 is permanent: no retries
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files

    # The loader now uses the downloader's CSV and leaves out the failed rows.
    table = datasets.load_dataset("fitzpatrick", tmp_path)
    assert list(table.df["record_id"]) == list(df["md5hash"][:3])

    # A corrupt partial file is re-fetched; verified files are kept (resumable); run through the CLI.
    (tmp_path / f"{df['md5hash'][0]}.jpg").write_bytes(b"\xff\xd8partial")
    hits_before = dict(server.hits)
    result = subprocess.run(
        [sys.executable, "-m", "medleak.data_utils.fitzpatrick_download", f"--csv={tmp_path / 'fitzpatrick17k.csv'}",
         f"--data_root={tmp_path}", "--retries=0", "--backoff=0", "--num_workers=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "3 of 5 images ready (1 downloaded, 2 already present), 2 failed" in result.stdout
    assert server.hits["/ok.jpg"] == hits_before["/ok.jpg"] + 1
    assert server.hits["/png.png"] == hits_before["/png.png"]
    assert server.hits["/flaky.jpg"] == hits_before["/flaky.jpg"]
    assert server.hits["/missing.jpg"] == hits_before["/missing.jpg"] + 1  # failures are tried again


def test_retries_give_up_with_the_last_error(tmp_path):
    # A port nobody listens on (bound, then released): connection refused every time.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = fitzpatrick_download.fetch_one("abc", f"http://127.0.0.1:{port}/x.jpg", tmp_path, retries=1,
                                             timeout=2, backoff=0.0)
    assert not outcome.success and "after 2 attempts" in outcome.error
    assert not (tmp_path / "abc.jpg").exists()
    assert "unsafe image id" in fitzpatrick_download.fetch_one("../x", "http://h/x", tmp_path).error


def test_refuses_to_overwrite_the_input_csv(tmp_path, server):
    _write_csv(tmp_path, server)
    with pytest.raises(MedleakError, match="never overwritten"):
        fitzpatrick_download.download_all(tmp_path / "fitzpatrick17k.csv", tmp_path,
                                          out_csv=tmp_path / "fitzpatrick17k.csv")
    result = subprocess.run([sys.executable, "-m", "medleak.data_utils.fitzpatrick_download",
                             f"--csv={tmp_path / 'nope.csv'}", f"--data_root={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ")
    assert "nope.csv" in result.stderr and len(result.stderr.strip().splitlines()) == 1
