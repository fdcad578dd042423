"""Download the Fitzpatrick17k images (the dataset ships only URLs).

    python -m medleak.data_utils.fitzpatrick_download --csv=fitzpatrick17k.csv --data_root=data/fitzpatrick

Parallel (thread pool), resumable (a `<md5hash>.jpg` already present that decodes is kept),
retries transient failures (timeouts, connection errors, HTTP 408/429/5xx) with exponential
back-off, verifies that every payload decodes as an image (non-JPEG images are re-encoded as
JPEG), and writes each file atomically. The result of every row goes to a NEW CSV
(`--out_csv`, default `<data_root>/fitzpatrick17k_downloaded.csv`) with `download_success` and
`download_error` columns; the user's CSV is never modified. The fitzpatrick loader picks that CSV
up automatically and leaves out the failed rows.
"""

import concurrent.futures
import dataclasses
import io
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from absl import flags
from PIL import Image
from tqdm import tqdm

from medleak import io_utils
from medleak.cli import run_absl
from medleak.data_utils import records
from medleak.data_utils.fitzpatrick import DOWNLOADED_CSV
from medleak.errors import MedleakError

RETRYABLE_HTTP = (408, 425, 429, 500, 502, 503, 504)
USER_AGENT = "Mozilla/5.0 (compatible; medleak-fitzpatrick-download)"
SAFE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass
class Outcome:
    success: bool
    status: str  # "downloaded" | "present" | "failed"
    error: str = ""


def download_all(csv_path, data_root, out_csv=None, *, num_workers=16, retries=4, timeout=30.0, backoff=1.0,
                 id_column="md5hash", url_column="url") -> dict:
    """Fetches every row's image to `<data_root>/<id>.jpg`; writes `out_csv`; returns a summary dict."""
    csv_path, data_root = Path(csv_path), Path(data_root)
    out_csv = Path(out_csv) if out_csv else data_root / DOWNLOADED_CSV
    if out_csv.resolve() == csv_path.resolve():
        raise MedleakError(f"--out_csv={out_csv} is the input --csv; choose another file "
                           "(the input is never overwritten)")
    df = records.read_csv(csv_path, "--csv")
    records.require_columns(df, [id_column, url_column], csv_path)
    data_root.mkdir(parents=True, exist_ok=True)

    # One task per distinct image id (the CSV may list an image twice).
    tasks = {}
    for image_id, url in zip(df[id_column].astype(str).str.strip(), df[url_column]):
        tasks.setdefault(image_id, url)

    def run(item):
        image_id, url = item
        return image_id, fetch_one(image_id, url, data_root, retries=retries, timeout=timeout, backoff=backoff)

    outcomes = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        for image_id, outcome in tqdm(pool.map(run, tasks.items()), total=len(tasks), desc="fitzpatrick images",
                                      unit="img"):
            outcomes[image_id] = outcome

    ids = df[id_column].astype(str).str.strip()
    out = df.copy()
    out["download_success"] = [outcomes[i].success for i in ids]
    out["download_error"] = [outcomes[i].error for i in ids]
    io_utils.write_csv(out_csv, out)
    statuses = [o.status for o in outcomes.values()]
    counts = {status: statuses.count(status) for status in ("downloaded", "present", "failed")}
    summary = dict(counts, total=len(outcomes), out_csv=str(out_csv))
    print(f"fitzpatrick download: {counts['downloaded'] + counts['present']} of {len(outcomes)} images ready "
          f"({counts['downloaded']} downloaded, {counts['present']} already present), {counts['failed']} failed; "
          f"results in {out_csv}")
    return summary


def fetch_one(image_id, url, data_root, *, retries=4, timeout=30.0, backoff=1.0) -> Outcome:
    """Downloads one image (with retries) to `<data_root>/<image_id>.jpg` unless a valid copy exists."""
    if not SAFE_ID.match(image_id):
        return Outcome(False, "failed", f"unsafe image id {image_id!r}")
    target = Path(data_root) / f"{image_id}.jpg"
    if target.is_file() and _decodes(target.read_bytes()):
        return Outcome(True, "present")
    if not isinstance(url, str) or not url.strip().lower().startswith(("http://", "https://")):
        return Outcome(False, "failed", f"no http(s) url ({url!r})")
    error = ""
    for attempt in range(int(retries) + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            payload = _get(url.strip(), timeout)
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code in RETRYABLE_HTTP:
                continue
            return Outcome(False, "failed", error)
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as e:
            error = " ".join(f"{type(e).__name__}: {getattr(e, 'reason', e)}".split())[:200]
            continue
        jpeg = _as_jpeg(payload)
        if jpeg is None:
            return Outcome(False, "failed", "payload is not an image")
        io_utils.write_bytes(target, jpeg)
        return Outcome(True, "downloaded")
    return Outcome(False, "failed", f"{error} after {int(retries) + 1} attempts")


def _get(url, timeout) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 — any decoder failure means "not a usable image"
        return False


def _as_jpeg(payload: bytes):
    """The payload as JPEG bytes (re-encoded if it is another image format), or None if no image."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            image.load()
            if image.format == "JPEG":
                return payload
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
            return buffer.getvalue()
    except Exception:  # noqa: BLE001
        return None


def _define_flags():
    flags.DEFINE_string("csv", None, "Fitzpatrick17k CSV with md5hash and url columns (never modified)")
    flags.DEFINE_string("data_root", None, "folder the <md5hash>.jpg files are saved into")
    flags.DEFINE_string("out_csv", None, f"result CSV with download_success (default: <data_root>/{DOWNLOADED_CSV})")
    flags.DEFINE_integer("num_workers", 16, "parallel downloads")
    flags.DEFINE_integer("retries", 4, "retries per image after a transient failure")
    flags.DEFINE_float("timeout", 30.0, "seconds per request")
    flags.DEFINE_float("backoff", 1.0, "seconds before the first retry; doubles on each further retry")
    flags.DEFINE_string("id_column", "md5hash", "image id column (file name without .jpg)")
    flags.DEFINE_string("url_column", "url", "image URL column")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.csv or not FLAGS.data_root:
        raise MedleakError("--csv and --data_root are required")
    download_all(FLAGS.csv, FLAGS.data_root, FLAGS.out_csv, num_workers=FLAGS.num_workers,
                 retries=FLAGS.retries, timeout=FLAGS.timeout, backoff=FLAGS.backoff,
                 id_column=FLAGS.id_column, url_column=FLAGS.url_column)


if __name__ == "__main__":
    _define_flags()
    run_absl(main)
