"""`cxrkit bench`: end-to-end images/s of the Detector against a naive baseline, same run.

The naive baseline is what a user would assemble by hand: Pillow decode, a numpy letterbox,
and torch eager, one image at a time, with the SAME model. The floor printed beside them is the
decode-alone rate of the same files with the decoders cxrkit's CPU path uses (cxrkit.io: Pillow for
JPEG, ISA-L inflate + the C++ unfilter for gray PNG), all cores: no pipeline beats its own decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["synthetic_radiograph", "write_images", "run_bench"]


def synthetic_radiograph(size: int, seed: int, bits: int = 8) -> np.ndarray:
    """A radiograph-like image (two dark lung fields, bright mediastinum, noise): never zeros."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.75 - 0.35 * np.exp(-(((x - 0.3) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2))
    img -= 0.35 * np.exp(-(((x - 0.7) / 0.16) ** 2 + ((y - 0.5) / 0.3) ** 2))
    small = rng.standard_normal((size // 32 + 2, size // 32 + 2)).astype(np.float32)
    from PIL import Image

    tex = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    img = img + 0.04 * tex + 0.02 * rng.standard_normal((size, size)).astype(np.float32)
    img = np.clip(img, 0, 1)
    if bits == 16:
        return (img * 65535).astype(np.uint16)
    return (img * 255).astype(np.uint8)


def write_images(folder: Path, n: int, size: int, fmt: str) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        if fmt == "jpeg":
            p = folder / f"syn_{i:04d}.jpg"
            Image.fromarray(synthetic_radiograph(size, i)).save(p, quality=90)
        elif fmt == "png16":
            p = folder / f"syn16_{i:04d}.png"
            Image.fromarray(synthetic_radiograph(size, i, bits=16)).save(p)
        elif fmt in ("dicom", "dicom-j2k"):
            p = folder / f"syn_{i:04d}.dcm"
            write_dicom(p, synthetic_radiograph(size, i, bits=16) >> 4, j2k=fmt == "dicom-j2k")
        else:
            raise ValueError(f"unknown format {fmt!r} (jpeg, png16, dicom, dicom-j2k)")
        out.append(p)
    return out


def write_dicom(path: Path, stored: np.ndarray, j2k: bool = False) -> Path:
    """A 12-bit MONOCHROME2 DX DICOM of ``stored`` (uint16 < 4096) with a rescale and a window, as
    a modality writes them; uncompressed, or JPEG 2000 lossless (pylibjpeg-openjpeg encodes it)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PhotometricInterpretation, ds.ViewPosition = "DX", "MONOCHROME2", "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 0, 16, 12, 11
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4000
    ds.PixelSpacing = [0.14, 0.14]
    stored = np.ascontiguousarray(stored, dtype=np.uint16)
    ds.PixelData = stored.tobytes()
    if j2k:
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)
    return path


def naive_baseline(model, paths: list[Path]) -> Callable[[], None]:
    """Pillow (DICOM: pydicom with its LUT functions) decode + Pillow resize + numpy letterbox +
    torch eager fp32, one image at a time, same model."""
    import torch
    from PIL import Image

    from .nets import create_net, load_weights
    from .preprocess.letterbox import letterbox_geometry

    card = model.card
    net = create_net(card.arch, **card.arch_kwargs)
    load_weights(net, model.verified("weights"))
    net.eval()
    H, W = card.input_hw

    def run() -> None:
        # one torch thread: with the default (one per core) a loaded 2-core box stalls in OpenMP
        # spin-waits (measured 1.4 s instead of 7 ms per forward), which would flatter cxrkit
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _run()
        finally:
            torch.set_num_threads(threads)

    def read(p: Path) -> np.ndarray:
        """(h, w) float32 in [0, 1]: Pillow, or for DICOM pydicom's own LUT functions."""
        if p.suffix == ".dcm":
            import pydicom
            from pydicom.pixels import apply_modality_lut, apply_voi_lut

            ds = pydicom.dcmread(p)
            a = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
            return 1.0 - a if ds.PhotometricInterpretation == "MONOCHROME1" else a
        im = Image.open(p)
        a = np.asarray(im)
        hi = 65535.0 if a.dtype == np.uint16 else 255.0
        if a.ndim == 3:
            a = np.asarray(im.convert("L"))
        return a.astype(np.float32) / hi

    def _run() -> None:
        for p in paths:
            a = read(p)
            tf = letterbox_geometry(a.shape, (H, W))
            small = Image.fromarray(a, mode="F").resize(tf.resized_hw[::-1], Image.BILINEAR)
            canvas = np.zeros((H, W), np.float32)
            t, l = tf.offset_yx
            canvas[t:t + tf.resized_hw[0], l:l + tf.resized_hw[1]] = np.asarray(small)
            x = torch.from_numpy((canvas - card.mean) / card.std)[None, None]
            with torch.inference_mode():
                lg, hm = net(x)
            torch.sigmoid(lg)

    return run


def decode_floor(paths: list[Path], threads: int) -> Callable[[], None]:
    from .io import decode_pixels, load_item

    def dec(p: Path) -> None:
        decode_pixels(load_item(str(p), 0))

    def run() -> None:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(dec, paths))

    return run


def _time(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_bench(a: argparse.Namespace) -> int:
    from .api import Detector

    det = Detector.from_pretrained(a.model, device=a.device, backend=a.backend, precision=a.precision,
                                   batch_size=a.batch_size)
    # the opt-in lossy JPEG path (DCT-domain downscaling while decoding), measured beside the exact one
    det_dct = Detector.from_pretrained(a.model, device=a.device, backend=a.backend, precision=a.precision,
                                       batch_size=a.batch_size, preprocess_options={"jpeg_dct_scaling": True}) \
        if a.device == "cpu" and "jpeg" in a.formats else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in a.formats.split(","):
            paths = write_images(Path(tmp) / fmt, a.images, a.size, fmt)
            t_base = _time(naive_baseline(det.model, paths), max(1, a.repeat - 1)) if det.card.arch else float("nan")
            t_floor = _time(decode_floor(paths, os.cpu_count() or 1), a.repeat)
            variants = [(fmt, det)] + ([(fmt + "+dct", det_dct)] if fmt == "jpeg" and det_dct else [])
            for label, d in variants:
                stage: dict[str, list[float]] = {}

                def ours(d=d, stage=stage) -> None:
                    for pr in d.predict_iter([str(p) for p in paths]):
                        if pr.error is not None:
                            raise RuntimeError(f"bench input failed: {pr.error}")
                        for k, v in pr.timings_ms.items():
                            stage.setdefault(k, []).append(v)

                t_ours = _time(ours, a.repeat)
                n = len(paths)
                rows.append({
                    "format": label, "images": n, "size": a.size, "device": a.device, "backend": d.backend_name,
                    "model": d.model.name, "cxrkit_img_s": n / t_ours, "baseline_img_s": n / t_base,
                    "ratio": t_base / t_ours, "decode_floor_img_s": n / t_floor,
                    "stage_ms_per_image": {k: float(np.median(v)) for k, v in stage.items()},
                })
    det.close()
    if det_dct:
        det_dct.close()
    print(f"cxrkit bench  model={rows[0]['model']} backend={rows[0]['backend']} device={a.device} "
          f"cores={os.cpu_count()}  (baseline: Pillow/pydicom + numpy + torch eager, one image at a time)")
    print(f"{'format':9} {'cxrkit img/s':>13} {'baseline img/s':>15} {'ratio':>7} {'decode floor img/s':>19}  stages ms/img")
    for r in rows:
        st = " ".join(f"{k}={v:.1f}" for k, v in r["stage_ms_per_image"].items())
        print(f"{r['format']:9} {r['cxrkit_img_s']:13.2f} {r['baseline_img_s']:15.2f} {r['ratio']:6.2f}x "
              f"{r['decode_floor_img_s']:19.2f}  {st}")
    if any(r["format"].endswith("+dct") for r in rows):
        print("jpeg+dct: opt-in Preprocessor(jpeg_dct_scaling=True): libjpeg decodes at 1/2..1/8 scale, then the same "
              "resize; not the exact reference function (mean 0.6-0.9, max up to ~34 8-bit steps at sharp edges)")
    if any(r["format"].startswith("dicom") for r in rows):
        print("dicom: 12-bit DX, rescale + window; baseline pydicom (pixel_array, apply_modality_lut, apply_voi_lut); "
              "dicom-j2k: the same, JPEG 2000 lossless")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0
