"""Convert the EMBED DICOM images to 8-bit PNG once, into the tree the embed loader reads.

    python -m medleak.data_utils.embed_prepare --data_root=data/embed --dicom_root=/path/to/embed/images

For every row of the metadata table (default: MLO/CC views only, as the loader keeps), the DICOM
at `<dicom_root>/<anon_dicom_path minus --dicom_prefix>` becomes
`<data_root>/<png_dir>/<same path>.png`: VOI LUT / windowing applied, MONOCHROME1 inverted,
scaled to 0–255, longer side resized to at most `--max_size`. Resumable (existing PNGs are kept),
parallel, atomic writes. Needs the optional dependency pydicom (`pip install pydicom`).
"""

import concurrent.futures
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from medleak import io_utils
from medleak.cli import run_absl
from medleak.data_utils import embed, records
from medleak.errors import MedleakError


def to_uint8_image(pixels, photometric="MONOCHROME2", max_size=512) -> np.ndarray:
    """A DICOM pixel array (after VOI LUT) → uint8 (H, W): min–max scaled, MONOCHROME1 inverted,
    longer side shrunk to `max_size` (0 keeps the size) with the aspect ratio kept."""
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.ndim == 3:  # multi-frame: the first frame
        pixels = pixels[0]
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"expected a 2-D image, got shape {pixels.shape}")
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    if str(photometric).strip().upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    image = Image.fromarray(np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8))
    if max_size and max(image.size) > max_size:
        factor = max_size / max(image.size)
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                             Image.Resampling.BILINEAR)
    return np.asarray(image)


def _require_pydicom():
    try:
        import pydicom
        from pydicom.pixels import apply_voi_lut
    except ImportError:
        raise MedleakError("converting EMBED DICOMs needs pydicom >= 3 (pip install pydicom; an optional "
                           "dependency)") from None
    return pydicom, apply_voi_lut


def read_dicom(path):
    """(pixels after the VOI LUT, photometric interpretation) of one DICOM file, via pydicom."""
    pydicom, apply_voi_lut = _require_pydicom()
    dataset = pydicom.dcmread(path)
    pixels = apply_voi_lut(dataset.pixel_array, dataset)
    return pixels, getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")


def prepare(data_root, dicom_root, *, metadata_csv=embed.OPTIONS["metadata_csv"][0],
            dicom_prefix=embed.OPTIONS["dicom_prefix"][0], png_dir=embed.OPTIONS["png_dir"][0],
            path_column="anon_dicom_path", view_column="ViewPosition", views=embed.OPTIONS["views"][0],
            max_size=512, num_workers=8) -> dict:
    """Converts every selected DICOM to PNG; returns counts {converted, present, failed, failures}."""
    _require_pydicom()  # fail before the long loop, not inside it
    data_root, dicom_root = Path(data_root), Path(dicom_root)
    if not dicom_root.is_dir():
        raise MedleakError(f"--dicom_root={dicom_root} is not a directory")
    meta_path = records.resolve_file(data_root, metadata_csv, "--metadata_csv")
    meta = records.read_csv(meta_path, "--metadata_csv", low_memory=False)
    records.require_columns(meta, [path_column] + ([view_column] if views else []), meta_path)
    wanted = records.parse_list(views)
    if wanted:
        meta = meta[meta[view_column].astype(str).str.strip().isin(wanted)]
    dicom_paths = meta[path_column].dropna().astype(str).unique()
    sources = [embed.dicom_relpath(p, dicom_prefix) for p in dicom_paths]
    targets = [embed.png_relpath(p, dicom_prefix, png_dir) for p in dicom_paths]
    records.check_paths_inside(targets, data_root, "embed")
    jobs = [(dicom_root / s, data_root / t) for s, t in zip(sources, targets)]

    def convert(job):
        source, target = job
        if target.is_file():
            return "present", None
        try:
            pixels, photometric = read_dicom(source)
            image = to_uint8_image(pixels, photometric, max_size)
        except FileNotFoundError:
            return "failed", f"{source} (file not found)"
        except Exception as e:  # noqa: BLE001 — report any unreadable DICOM and go on
            return "failed", " ".join(f"{source} ({type(e).__name__}: {e})".split())[:300]
        with io_utils.atomic_path(target, suffix=".png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        return "converted", None

    counts = {"converted": 0, "present": 0, "failed": 0}
    failures = []
    with concurrent.futures.ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        for status, failure in tqdm(pool.map(convert, jobs), total=len(jobs), desc="EMBED DICOM → PNG", unit="img"):
            counts[status] += 1
            if failure:
                failures.append(failure)
    first_failure = f" (first: {failures[0]})" if failures else ""
    print(f"embed prepare: {counts['converted']} converted, {counts['present']} already present, "
          f"{counts['failed']} failed{first_failure}; PNGs under {data_root / png_dir}")
    return dict(counts, failures=failures)


def _define_flags():
    flags.DEFINE_string("data_root", None, "EMBED folder holding tables/ (the PNG tree is written here)")
    flags.DEFINE_string("dicom_root", None, "folder of the downloaded DICOM tree (cohort_1/..., cohort_2/...)")
    flags.DEFINE_string("metadata_csv", embed.OPTIONS["metadata_csv"][0], "metadata table, relative to --data_root")
    flags.DEFINE_string("dicom_prefix", embed.OPTIONS["dicom_prefix"][0], "prefix of anon_dicom_path to strip")
    flags.DEFINE_string("png_dir", embed.OPTIONS["png_dir"][0], "PNG folder, relative to --data_root")
    flags.DEFINE_string("views", embed.OPTIONS["views"][0], "comma-separated views to convert; empty converts all")
    flags.DEFINE_integer("max_size", 512, "longer side of the PNGs in pixels (0 keeps the DICOM size)")
    flags.DEFINE_integer("num_workers", 8, "parallel conversions")


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS.data_root or not FLAGS.dicom_root:
        raise MedleakError("--data_root and --dicom_root are required")
    prepare(FLAGS.data_root, FLAGS.dicom_root, metadata_csv=FLAGS.metadata_csv, dicom_prefix=FLAGS.dicom_prefix,
            png_dir=FLAGS.png_dir, views=FLAGS.views, max_size=FLAGS.max_size, num_workers=FLAGS.num_workers)


if __name__ == "__main__":
    _define_flags()
    run_absl(main)
