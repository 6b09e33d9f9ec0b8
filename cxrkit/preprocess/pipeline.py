"""Preprocessing: LoadedImage -> normalised letterboxed (N, 1, H, W) float32 model input.

One DALI ``@pipeline_def`` graph, built in two variants by ``encoded``:

- encoded: JPEG / PNG bytes -> ``fn.decoders.image(output_type=GRAY)`` (``device="mixed"`` on a
  GPU, ``"cpu"`` here). ``dtype`` is UINT8 for JPEG and 8-bit PNG and UINT16 for 16-bit PNG: the
  decoder's default UINT8 would rescale a 16-bit PNG to 8 bits (it converts to the dynamic range
  of the requested type, 33375 -> 130), so 16-bit PNGs get their own UINT16 variant.
  JPEG 2000 frames of DICOMs whose gray mapping is linear (see dicom_j2k.py) take the UINT16
  variant with a per-sample float clamp in stored units (``dali.math.clamp``) before the resize; on
  device="cuda" that is nvJPEG2000, on "cpu" they use io's decoded pixels unless
  ``dicom_j2k="dali"``.
- raw: (h, w) arrays that cxrkit.io decoded (DICOM pixels, PNGs DALI cannot decode, ...), and
  JPEGs decoded by Pillow with DCT-domain downscaling (``jpeg_dct_scaling=True``, CPU only: see
  :func:`dct_scale`); the resize reads the region [0, h/k) x [0, w/k) of such a k-scaled decode
  (``roi_end``), the part that is image.

Both then run ``fn.resize`` (antialiased linear, to the per-sample (nh, nw) that
:func:`letterbox_geometry` decided in Python, float32 output) and ``fn.crop_mirror_normalize``,
which in one pass applies the per-sample value range and the model normalisation as one affine
map, pads to (H, W) at the letterbox offset with the normalised padding value, and writes CHW.
The value range is applied after the resize (see reference.py: resizing is linear, weights sum to
1), so the full-resolution image is never converted to float. The numpy path
(:func:`preprocess_reference`) computes the same function and is the fallback without DALI;
it runs one image per thread (``num_threads``) with numpy's BLAS held to one thread (_blas.py).

CPU cost per 2048^2 image -> 512^2, measured with benchmarks/bench_preprocess.py (CPU ms per
image, a loaded 2-core box): JPEG q90 - Pillow decode alone 14.4, DALI 31.0, numpy path 26.4,
with jpeg_dct_scaling 16.5 (DALI) / 14.1 (numpy); 16-bit PNG - Pillow decode alone 55.9,
DALI 69.0, numpy 69.8. Decoding dominates: the exact function cannot cost much less than the
decoder, so on CPU the gain over a one-image-at-a-time loop is the cores, plus DCT scaling for
JPEG if its tolerance is acceptable.
"""

from __future__ import annotations

import contextlib
import functools
import io as _io
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

from cxrkit.config import Device, device_index
from cxrkit.backends.base import as_out_of_memory
from cxrkit.errors import BackendUnavailableError, CxrkitError, DecodeError, InputError, OutOfMemoryError
from cxrkit.preprocess._blas import blas_single_thread
from cxrkit.io.dicom_j2k import codestream_precision, dali_uint16_multiplier, is_encoded_j2k
from cxrkit.preprocess.letterbox import FITS, LetterboxTransform, letterbox_geometry
from cxrkit.preprocess.reference import (
    check_value_range,
    clip_to_range,
    pad_value,
    preprocess_reference,
)

__all__ = ["Preprocessor", "PreprocessResult", "dali_available", "dct_scale"]

_log = logging.getLogger(__name__)

DALI_INSTALL_HINT = "pip install nvidia-dali-cuda130  (or: pip install 'cxrkit[dali]')"
# Share of JPEGs sent to the NVJPG hardware engines on device="mixed". The rest is decoded by the
# hybrid CUDA decoder whose Huffman stage runs on the pipeline's CPU threads (~8-10 ms per 2048^2
# JPEG per thread). For chest X-rays (few large JPEGs) the engines are the faster path (~3,000
# 2048^2 img/s on H100), so most of the load goes there; sweep 0.75-1.0 on the target GPU.
HW_DECODER_LOAD = 0.9
MAX_DCT_SCALE = 8  # libjpeg scales by 1/2, 1/4, 1/8
_RAW_DTYPES = (np.uint8, np.uint16, np.float32)  # raw dtypes fed as is; others go as float32
_warned_no_dali = False


@dataclass
class PreprocessResult:
    batch: Any  # (N_ok, 1, H, W) float32: np.ndarray on CPU, torch CUDA tensor on device="cuda"
    transforms: list[LetterboxTransform]  # one per ok item, same order as batch rows
    ok_positions: list[int]  # positions in `images` that made it into `batch`, ascending
    # position -> typed error: InputError (bad item) or OutOfMemoryError (the item did not fit alone)
    errors: dict[int, CxrkitError] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _graph() -> Any:
    """The @pipeline_def graph; defined on first use so that `import cxrkit` never imports DALI."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise BackendUnavailableError(
            f"NVIDIA DALI is not installed ({e}); install it with: {DALI_INSTALL_HINT}"
        ) from None

    import nvidia.dali.math as dmath

    @pipeline_def
    def cxr_preprocess(
        encoded: bool, device: str, dtype_name: str, clip: bool, input_hw: tuple[int, int],
        fill: float, hw_decoder_load: float,
    ):
        decoder_device = "cpu" if device == "cpu" else "mixed"
        dtype = {"uint8": types.UINT8, "uint16": types.UINT16, "float32": types.FLOAT}[dtype_name]
        roi = {}
        if encoded:
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)  # file bytes
            hw = {} if decoder_device == "cpu" else {"hw_decoder_load": hw_decoder_load}
            img = fn.decoders.image(
                data, device=decoder_device, output_type=types.GRAY, dtype=dtype,
                adjust_orientation=False, **hw,
            )  # (h, w, 1)
            shape = fn.peek_image_shape(data, adjust_orientation=False)  # (3,) h, w, c from header
            if clip:  # JPEG 2000 DICOM frames. First undo the decoder's rescaling of the sample
                # precision to the uint16 range (dicom_j2k.dali_uint16_multiplier: x16.004 for a
                # 12-bit frame on the GPU): floor(x / m + 0.5) restores the stored values exactly.
                unscale = fn.external_source(name="unscale", dtype=types.FLOAT, ndim=0)  # 1 / m
                img = dmath.floor(img * unscale + 0.5)  # (h, w, 1) float32, stored units
                # then saturate to the value range (stored units) before the resize, as the
                # reference; float bounds (a window edge may fall between two stored values)
                lo_c = fn.external_source(name="clip_lo", dtype=types.FLOAT, ndim=0)
                hi_c = fn.external_source(name="clip_hi", dtype=types.FLOAT, ndim=0)
                img = dmath.clamp(img, lo_c, hi_c)  # (h, w, 1) float32
        else:
            img = fn.external_source(name="data", dtype=dtype, ndim=3, layout="HWC")  # (h, w, 1)
            if device != "cpu":
                img = img.gpu()
            # the image part of the input: (h, w), or (h/k, w/k) of a JPEG decoded at scale 1/k
            roi = dict(roi_start=[0.0, 0.0], roi_relative=False,
                       roi_end=fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1))
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)  # (2,) nh, nw
        shift = fn.external_source(name="shift", dtype=types.FLOAT, ndim=0)  # lo + mean * (hi - lo)
        scale = fn.external_source(name="scale", dtype=types.FLOAT, ndim=0)  # (hi - lo) * std
        pos_y = fn.external_source(name="pos_y", dtype=types.FLOAT, ndim=0)  # top / (H - nh)
        pos_x = fn.external_source(name="pos_x", dtype=types.FLOAT, ndim=0)  # left / (W - nw)
        resized = fn.resize(
            img, size=size, dtype=types.FLOAT, interp_type=types.INTERP_LINEAR, antialias=True, **roi
        )  # (nh, nw, 1) float, source units
        # crop (H, W) >= (nh, nw): the crop anchor round(pos * (nh - H)) is exactly -top (-left),
        # the rest is padded with `fill`, written after normalisation; (x - shift) / scale is
        # ((x - lo) / (hi - lo) - mean) / std.
        out = fn.crop_mirror_normalize(
            resized, crop=list(input_hw), crop_pos_y=pos_y, crop_pos_x=pos_x,
            out_of_bounds_policy="pad", fill_values=[fill], mean=shift, std=scale,
            dtype=types.FLOAT, output_layout="CHW",
        )  # (1, H, W) normalised
        return (out, shape) if encoded else out

    return cxr_preprocess


def _png_bit_depth(data: bytes) -> int | None:
    """Bit depth from the PNG IHDR chunk (None if the header is not a PNG IHDR)."""
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int(data[24])


def _encoded_dtype(img: Any) -> str | None:
    """'uint8' / 'uint16' if DALI decodes `img` from its bytes exactly, else None (raw path).

    The value range must cover the whole coded range, so that no saturation (clip) is needed."""
    if img.pixels is not None or img.encoded is None or not img.dali_decodable:
        return None
    bits = 8 if img.format == "jpeg" else _png_bit_depth(img.encoded) if img.format == "png" else None
    if bits not in (8, 16):
        return None
    lo, hi = sorted(float(v) for v in img.value_range)
    if lo > 0.0 or hi < 2.0**bits - 1:
        return None
    return "uint8" if bits == 8 else "uint16"


def dct_scale(src_hw: tuple[int, int], resized_hw: tuple[int, int]) -> int:
    """The JPEG DCT-domain scale k (decode at 1/k) for a letterbox resize src_hw -> resized_hw:
    the largest power of two <= the smaller downscale factor, at most 8; 1 below a factor of 2.
    The antialiased triangle resize then does the rest (factor / k, in [1, 2) unless capped)."""
    factor = min(src_hw[0] / resized_hw[0], src_hw[1] / resized_hw[1])
    k = 1
    while k * 2 <= min(factor, MAX_DCT_SCALE):
        k *= 2
    return k


def _dct_candidate(img: Any) -> bool:
    """An 8-bit JPEG still encoded, that libjpeg (Pillow) decodes and whose range is (0, 255)."""
    if img.format != "jpeg" or img.pixels is not None or img.encoded is None or not img.dali_decodable:
        return False
    return tuple(float(v) for v in img.value_range) == (0.0, 255.0)


def _decode_dct(img: Any, k: int) -> tuple[np.ndarray, tuple[float, float]]:
    """(ceil(h/k), ceil(w/k)) uint8 gray decoded by libjpeg at scale 1/k, and the image extent
    (h/k, w/k) in those pixels. Gray comes from libjpeg's Y (colour JPEGs: <= 1 LSB from Pillow's
    RGB -> L). Raises DecodeError for corrupt data."""
    from PIL import Image

    h, w = img.image_size
    try:
        with Image.open(_io.BytesIO(img.encoded), formats=["JPEG"]) as im:
            im.draft("L", (w // k, h // k))  # libjpeg picks the largest 1/k with size >= request
            if im.mode != "L":
                im = im.convert("L")
            else:
                im.load()
            arr = np.asarray(im)
    except Exception as e:  # Pillow raises OSError / SyntaxError / ValueError on bad data
        raise DecodeError(img.source, f"corrupt or truncated JPEG: {e}") from e
    if arr.shape != (math.ceil(h / k), math.ceil(w / k)):
        raise DecodeError(img.source, f"JPEG decoded at 1/{k} to {arr.shape}, expected "
                          f"{(math.ceil(h / k), math.ceil(w / k))} from the header size {(h, w)}")
    return np.ascontiguousarray(arr), (h / k, w / k)


def _raw_pixels(img: Any) -> tuple[np.ndarray, tuple[float, float]]:
    """(h, w) pixels of `img` and their value range, decoding its bytes with Pillow (cxrkit.io)
    if needed (decoding may change the value range, e.g. a 16-bit colour PNG read at 8 bits)."""
    if img.pixels is None:
        if img.format == "dicom":
            if getattr(img, "decode_fallback", None) is not None:  # a JPEG 2000 frame kept for the GPU
                img = img.decode_fallback()
                return _raw_pixels(img)
            raise DecodeError(img.source, "DICOM item without decoded pixels: its encoded frame "
                              "can only be decoded by the DALI pipeline")
        from cxrkit.io import decode_pixels

        img = decode_pixels(img)
    px = np.asarray(img.pixels)
    if px.ndim != 2:
        raise InputError(img.source, f"expected (h, w) gray pixels, got shape {px.shape}")
    return px, check_value_range(img.value_range, img.source)


def _dali_reason(exc: BaseException) -> str:
    """The useful part of a DALI pipeline error (it also carries the graph's Python traceback)."""
    text = " ".join(str(exc).split())
    reason = text.split("encountered:")[-1].replace("Current pipeline object is no longer valid.", "")
    return reason.strip()[:300] or type(exc).__name__


_Key = tuple[bool, str, bool]  # pipeline variant: (encoded, dtype name, clip)
_FAILED_SAMPLE = re.compile(r"Failed to decode sample #(\d+)")  # DALI's image decoder names the sample


class _Job(NamedTuple):  # one item on its way through a DALI pipeline variant
    pos: int
    source: str
    format: str
    data: np.ndarray  # (n_bytes,) uint8 file bytes, or (h', w', 1) pixels
    value_range: tuple[float, float]
    extent: tuple[float, float]  # raw: the image part [0, eh) x [0, ew) of `data`
    clip: tuple[float, float] | None = None  # encoded + clip: (min, max) of the value range
    unscale: float = 1.0  # encoded + clip: 1 / the decoder's uint16 multiplier (dicom_j2k.py)


def _native_available() -> bool:
    try:
        from cxrkit import _C
    except ImportError:
        return False
    return hasattr(_C, "resize_aa_u8")


class Preprocessor:
    """Runs preprocessing for batches of LoadedImage; one instance per device, not thread-safe.

    Options beyond the model's geometry and normalisation:
      device: "cpu" or "cuda[:i]"; on CUDA, ``run`` returns a (N, 1, H, W) float32 CUDA tensor,
        complete when ``run`` returns (the copies run on the preprocessor's own stream and ``run``
        waits for their event only, never for the default stream or the whole device).
      backend: "auto" (CPU: "native" when cxrkit._C is built; CUDA: DALI if installed; else numpy),
        "dali", "numpy" (the reference itself) or "native" (Pillow decode + the C++ resize).
      batch_size: images per DALI run; num_threads: DALI CPU threads (decode, resize on "cpu";
        Huffman decoding of the JPEGs not sent to the hardware decoder, JPEG 2000 tier-2 on CUDA),
        and Pillow decode threads for ``jpeg_dct_scaling``.
      hw_decoder_load: share of JPEGs sent to the NVJPG engines (CUDA; see HW_DECODER_LOAD).
      jpeg_dct_scaling: on device="cpu", decode 8-bit JPEGs whose letterbox downscale is >= 2 at
        1/k scale in the DCT domain (libjpeg, k = dct_scale()), then resize the rest with the same
        filter. Faster; NOT the reference function: differences are largest at sharp edges (text,
        borders; see tests/test_preprocess.py for the measured tolerance). Default False.
      fit: "letterbox" (default), "center_crop" or "stretch": how the image is fitted to the input
        (a model card's ``input.fit``; see letterbox.py). Every path computes the same function.
      dicom_j2k: "auto": on CUDA, JPEG 2000 DICOM frames with a linear mapping are decoded by
        nvJPEG2000 (see dicom_j2k.py); on CPU io's decoded pixels are used. "dali": the DALI
        decoder on every device (CPU: OpenJPEG). "pixels": always io's decoded pixels.
    """

    def __init__(
        self,
        input_hw: tuple[int, int],
        mean: float,
        std: float,
        *,
        device: str = "cpu",
        backend: str = "auto",
        batch_size: int = 8,
        num_threads: int = 2,
        device_id: int | None = None,
        hw_decoder_load: float = HW_DECODER_LOAD,
        jpeg_dct_scaling: bool = False,
        dicom_j2k: str = "auto",
        fit: str = "letterbox",
    ) -> None:
        global _warned_no_dali
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.mean, self.std = float(mean), float(std)
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        if batch_size < 1 or num_threads < 1:
            raise ValueError(f"batch_size and num_threads must be >= 1, got {batch_size}, {num_threads}")
        if not 0.0 <= float(hw_decoder_load) <= 1.0:
            raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        if dicom_j2k not in ("auto", "dali", "pixels"):
            raise ValueError(f"dicom_j2k must be 'auto', 'dali' or 'pixels', got {dicom_j2k!r}")
        self.device = Device.parse(device)
        self.device_id = device_id if device_id is not None else max(0, device_index(str(device)))
        self.batch_size, self.num_threads = int(batch_size), int(num_threads)
        self.hw_decoder_load = float(hw_decoder_load)
        self.jpeg_dct_scaling = bool(jpeg_dct_scaling)
        self.dicom_j2k = dicom_j2k
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        self.fit = fit
        if backend not in ("auto", "dali", "numpy", "native"):
            raise ValueError(f"backend must be 'auto', 'dali', 'numpy' or 'native', got {backend!r}")
        # "native": the numpy path with the resize in cxrkit._C (resize_linear_aa_fast, the same
        # function within float32 rounding). On the CPU it is measured faster than DALI's CPU
        # operators (Pillow decodes JPEG faster per core, and the sparse resize is ~4x the dense
        # one), so "auto" picks it there; on CUDA "auto" picks DALI "mixed".
        self.fast_resize = False
        if backend == "auto" and self.device == Device.CPU and _native_available():
            backend = "native"
        if backend == "native":
            backend, self.fast_resize = "numpy", True
        if backend == "auto":
            backend = "dali" if dali_available() else "numpy"
            if backend == "numpy" and not _warned_no_dali:
                _warned_no_dali = True
                _log.warning(
                    "NVIDIA DALI is not installed: preprocessing uses the numpy path (on CPU "
                    "about as fast; on a GPU it decodes and resizes on the CPU). Install it "
                    "with: %s", DALI_INSTALL_HINT,
                )
        elif backend == "dali":
            _graph()  # raises BackendUnavailableError with the pip command
        self.backend = backend
        self._fill = pad_value(self.mean, self.std)
        self._pipes: dict[_Key, Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._stream: Any = None  # CUDA: own stream for the DALI -> torch copies (_copy_stream)

    # -- public -------------------------------------------------------------------------------
    def run(self, images: Sequence[Any]) -> PreprocessResult:
        t0 = time.perf_counter()
        outputs: dict[int, Any] = {}  # position -> (1, H, W)
        transforms: dict[int, LetterboxTransform] = {}
        errors: dict[int, InputError] = {}
        timings = {"prepare": 0.0, "pipeline": 0.0}
        whole = None  # the numpy path writes each row into one (N, 1, H, W) array
        if self.backend == "numpy":
            whole = self._run_numpy(images, outputs, transforms, errors, timings)
        else:
            self._run_dali(images, outputs, transforms, errors, timings)
        ok = sorted(outputs)
        if whole is not None and len(ok) == len(images):  # every row written: no copy on the host
            batch = whole if self.device != Device.CUDA else self._upload(whole)
        else:
            batch = self._assemble([outputs[p] for p in ok])  # (N_ok, 1, H, W)
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return PreprocessResult(batch, [transforms[p] for p in ok], ok, errors, timings)

    def _assemble(self, rows: list[Any]) -> Any:
        H, W = self.input_hw
        on_gpu = self.device == Device.CUDA
        if on_gpu:
            import torch

            dev = torch.device("cuda", self.device_id)
            if self.backend == "dali":  # rows: (1, H, W) views of per-chunk CUDA tensors
                with torch.cuda.device(dev):
                    cur, side = torch.cuda.current_stream(dev), self._copy_stream()
                    out = torch.empty((len(rows), 1, H, W), dtype=torch.float32, device=dev)
                    if rows:
                        side.wait_stream(cur)  # `out` may reuse memory that cur's queued work still reads
                        with torch.cuda.stream(side):
                            torch.stack(rows, out=out)
                        out.record_stream(side)
                    done = torch.cuda.Event()
                    done.record(side)
                # The chunk copies and the stack ran on the preprocessor's own stream; waiting for
                # its event waits for this batch's copies only (not the default stream, where a
                # host sync would also wait for other threads' inference). The consumer (the
                # Detector's inference, another thread, maybe another stream) gets a finished tensor.
                done.synchronize()
                return out  # (N_ok, 1, H, W) contiguous: batch[a:b] slices are views
        batch = np.empty((len(rows), 1, H, W), dtype=np.float32)  # (N_ok, 1, H, W)
        for row, arr in enumerate(rows):
            batch[row] = arr
        return self._upload(batch) if on_gpu else batch

    def _upload(self, batch: np.ndarray) -> Any:
        """numpy path on a CUDA device: one upload of the finished batch."""
        import torch

        return torch.from_numpy(batch).to(torch.device("cuda", self.device_id))

    def _copy_stream(self) -> Any:
        """The preprocessor's own CUDA stream for DALI -> torch copies (created on first use)."""
        if self._stream is None:
            import torch

            self._stream = torch.cuda.Stream(torch.device("cuda", self.device_id))
        return self._stream

    def close(self) -> None:
        self._pipes.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "Preprocessor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- routing ------------------------------------------------------------------------------
    def _dct_k(self, img: Any) -> int:
        """1, or the DCT scale to decode `img` at (jpeg_dct_scaling, CPU, 8-bit JPEG, factor >= 2)."""
        if not self.jpeg_dct_scaling or self.device != Device.CPU or not _dct_candidate(img):
            return 1
        t = letterbox_geometry(img.image_size, self.input_hw, self.fit)
        return dct_scale(t.src_hw, t.resized_hw)

    def _j2k_encoded(self, img: Any) -> bool:
        if self.backend != "dali" or self.dicom_j2k == "pixels" or not is_encoded_j2k(img):
            return False
        return self.dicom_j2k == "dali" or self.device == Device.CUDA

    def _decode_many(self, jobs: list[tuple[int, Any, int]]) -> dict[int, Any]:
        """pos -> (pixels, extent) or the DecodeError, for Pillow 1/k decodes (threads: Pillow
        releases the GIL while decoding)."""
        def one(job):
            pos, img, k = job
            try:
                return pos, _decode_dct(img, k)
            except InputError as e:
                return pos, e

        if len(jobs) <= 1 or self.num_threads <= 1:
            return dict(one(j) for j in jobs)
        return dict(self._executor().map(one, jobs))

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="cxrkit-pre")
        return self._pool

    # -- numpy path ---------------------------------------------------------------------------
    def _numpy_one(self, pos: int, img: Any, out: np.ndarray | None = None) -> tuple[int, Any]:
        """(pos, ((1, H, W), transform)) or (pos, InputError): decode + the reference, one item,
        written into ``out`` (a row of the batch) when given."""
        try:
            k = self._dct_k(img)
            if k > 1:
                (px, extent), vr = _decode_dct(img, k), (0.0, 255.0)
                src_hw = tuple(img.image_size)
            else:
                px, vr = _raw_pixels(img)
                extent, src_hw = None, px.shape
            return pos, preprocess_reference(
                px, vr, self.input_hw, self.mean, self.std, src_hw=src_hw, extent_hw=extent,
                fast=self.fast_resize, fit=self.fit, out=out,
            )
        except InputError as e:
            return pos, e
        except ValueError as e:
            return pos, InputError(img.source, str(e))

    def _at_input_size(self, img: Any) -> bool:
        """uint8 / uint16 pixels of exactly the input size, on the native path: their preprocessing is
        one C++ pass of ~10 µs (no decode, no resize), less than handing them to the pool's threads
        costs (measured on 2 cores: 60 vs 76 CPU µs per image for a batch of 64 256² arrays)."""
        px = img.pixels
        return (self.fast_resize and px is not None and px.shape == self.input_hw
                and (px.dtype == np.uint8 or px.dtype == np.uint16))

    def _run_numpy(self, images, outputs, transforms, errors, timings) -> np.ndarray:
        """The reference, one image per thread (Pillow decode and numpy's matmul release the GIL),
        numpy's BLAS kept to one thread meanwhile (see _blas.py). Each image is written into its
        row of one (N, 1, H, W) array, which is returned."""
        t0 = time.perf_counter()
        H, W = self.input_hw
        whole = np.empty((len(images), 1, H, W), dtype=np.float32)  # (N, 1, H, W)
        # the C++ resize and normalisation (fast_resize) call no BLAS: nothing to hold to one thread
        with contextlib.nullcontext() if self.fast_resize else blas_single_thread():
            if len(images) <= 1 or self.num_threads <= 1 or all(self._at_input_size(img) for img in images):
                done = [self._numpy_one(pos, img, whole[pos]) for pos, img in enumerate(images)]
            else:
                done = list(self._executor().map(self._numpy_one, range(len(images)), images, whole))
        for pos, got in done:
            if isinstance(got, InputError):
                errors[pos] = got
            else:
                outputs[pos], transforms[pos] = got
        timings["pipeline"] = (time.perf_counter() - t0) * 1e3
        return whole

    # -- DALI path ----------------------------------------------------------------------------
    def _job(self, pos: int, img: Any, decoded: dict[int, Any]) -> tuple[_Key, _Job, tuple[int, int]]:
        """(variant, job, source (h, w)) of one item. Raises InputError / ValueError."""
        vr = check_value_range(img.value_range, img.source)
        if pos in decoded:  # JPEG decoded by libjpeg at 1/k
            got = decoded[pos]
            if isinstance(got, InputError):
                raise got
            px, extent = got
            src_hw = (int(img.image_size[0]), int(img.image_size[1]))
            return (False, "uint8", False), _Job(pos, img.source, img.format, px[:, :, None], (0.0, 255.0), extent), src_hw
        precision = codestream_precision(img.encoded) if self._j2k_encoded(img) else None
        if precision is not None and precision <= 16:  # DICOM JPEG 2000 frame, range in stored units
            lo, hi = check_value_range(img.meta["linear_stored_range"], img.source)
            clip = (min(lo, hi), max(lo, hi))
            data = np.frombuffer(img.encoded, dtype=np.uint8)  # (n_bytes,)
            src_hw = (int(img.image_size[0]), int(img.image_size[1]))
            unscale = 1.0 / dali_uint16_multiplier(precision, gpu=self.device == Device.CUDA)
            return (True, "uint16", True), _Job(pos, img.source, "jpeg2000", data, (lo, hi), src_hw, clip,
                                                unscale), src_hw
        enc_dtype = _encoded_dtype(img)
        if enc_dtype is not None:
            data = np.frombuffer(img.encoded, dtype=np.uint8)  # (n_bytes,)
            src_hw = (int(img.image_size[0]), int(img.image_size[1]))
            return (True, enc_dtype, False), _Job(pos, img.source, img.format, data, vr, src_hw), src_hw
        px, vr = _raw_pixels(img)
        px = clip_to_range(px, vr)  # (h, w)
        if px.dtype not in _RAW_DTYPES:
            px = px.astype(np.float32)
        src_hw = (int(px.shape[0]), int(px.shape[1]))
        return (False, px.dtype.name, False), _Job(pos, img.source, img.format, px[:, :, None], vr, src_hw), src_hw

    def _run_dali(self, images, outputs, transforms, errors, timings) -> None:
        t0 = time.perf_counter()
        dct = {pos: k for pos, img in enumerate(images) if (k := self._dct_k(img)) > 1}
        decoded = self._decode_many([(pos, images[pos], k) for pos, k in dct.items()])
        groups: dict[_Key, list[_Job]] = {}
        for pos, img in enumerate(images):
            try:
                key, job, src_hw = self._job(pos, img, decoded)
                transforms[pos] = letterbox_geometry(src_hw, self.input_hw, self.fit)
            except InputError as e:
                errors[pos] = e
                continue
            except ValueError as e:
                errors[pos] = InputError(img.source, str(e))
                continue
            groups.setdefault(key, []).append(job)
        t1 = time.perf_counter()
        timings["prepare"] = (t1 - t0) * 1e3

        for key, jobs in groups.items():
            for i in range(0, len(jobs), self.batch_size):
                self._run_jobs(key, jobs[i : i + self.batch_size], images, transforms, outputs, errors)
        for pos in errors:
            transforms.pop(pos, None)
        timings["pipeline"] = (time.perf_counter() - t1) * 1e3

    def _run_jobs(self, key: _Key, jobs: list[_Job], images, transforms, outputs, errors) -> None:
        """Run ``jobs`` (<= batch_size) through one pipeline variant; a bad item never spoils the rest.

        A failed run drops the pipeline (DALI: "Current pipeline object is no longer valid"; it is
        rebuilt on next use, so every run after a failure is on a fresh pipeline) and then:
        - out of device memory: DALI's unused pool memory is released and the jobs run in halves;
          an item that alone still does not fit gets OutOfMemoryError (never "corrupt");
        - a decode error naming its sample ("Failed to decode sample #k", DALI's decoder): that
          item runs alone, the rest together again (one bad file in 256: three runs, not 257);
        - otherwise: halves, recursively (log2 n levels).
        A single item that fails on its own is the item's fault: the CPU fallback for J2K DICOM
        frames, else a DecodeError.
        """
        try:
            self._run_chunk(key, jobs, transforms, outputs, errors)
            return
        except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError for everything
            err = e
        self._pipes.pop(key, None)
        oom = as_out_of_memory(err, "DALI preprocessing")
        if oom is not None:
            self._release_device_memory()
        if len(jobs) == 1:
            one = jobs[0]
            if oom is not None and getattr(images[one.pos], "decode_fallback", None) is None:
                errors[one.pos] = OutOfMemoryError(
                    f"{one.source!r}: out of GPU memory preprocessing this {one.format} image alone "
                    f"({_dali_reason(err)}); free GPU memory or use a smaller batch_size")
                errors[one.pos].__cause__ = err
                return
            if self._cpu_fallback(one.pos, images[one.pos], transforms, outputs, errors, err):
                return
            errors[one.pos] = DecodeError(
                one.source, f"DALI could not decode this {one.format} image ({_dali_reason(err)}); the "
                "file is corrupt or truncated, or uses a variant DALI does not read",
            )
            return
        m = None if oom is not None else _FAILED_SAMPLE.search(str(err))
        k = int(m.group(1)) if m else -1
        if 0 <= k < len(jobs):
            parts = [[jobs[k]], jobs[:k] + jobs[k + 1:]]
        else:
            mid = len(jobs) // 2
            parts = [jobs[:mid], jobs[mid:]]
        _log.info("DALI batch of %d failed (%s); retrying as %s", len(jobs),
                  "out of memory" if oom is not None else _dali_reason(err)[:120], [len(p) for p in parts])
        for part in parts:
            self._run_jobs(key, part, images, transforms, outputs, errors)

    def _release_device_memory(self) -> None:
        """After an out-of-memory error: give DALI's and torch's cached, unused device memory back."""
        try:
            from nvidia.dali import backend as dali_backend

            release = getattr(dali_backend, "ReleaseUnusedMemory", None)
            if release is not None:
                release()
        except Exception:  # noqa: BLE001 - best effort
            pass
        if self.device == Device.CUDA:
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def _cpu_fallback(self, pos: int, img: Any, transforms, outputs, errors, exc: BaseException) -> bool:
        """A DICOM JPEG 2000 frame the GPU decoder refused: decode it on the CPU (io) and run it
        through the raw-pixel route. True when handled (its output or its typed error recorded)."""
        fallback = getattr(img, "decode_fallback", None)
        if fallback is None:
            return False
        _log.info("%s: the JPEG 2000 decoder failed (%s); decoding on the CPU", img.source, _dali_reason(exc))
        key = None
        try:
            key, job, src_hw = self._job(pos, fallback(), {})
            transforms[pos] = letterbox_geometry(src_hw, self.input_hw, self.fit)
            self._run_chunk(key, [job], transforms, outputs, errors)
        except InputError as e:
            errors[pos] = e
        except ValueError as e:
            errors[pos] = InputError(img.source, str(e))
        except Exception as e:  # noqa: BLE001 - the item's own error, never the batch's
            if key is not None:
                self._pipes.pop(key, None)
            oom = as_out_of_memory(e, "DALI preprocessing")
            if oom is not None:
                errors[pos] = OutOfMemoryError(f"{img.source!r}: out of GPU memory preprocessing the CPU-decoded "
                                               f"JPEG 2000 frame ({_dali_reason(e)})")
            else:
                errors[pos] = DecodeError(img.source, "could not preprocess the CPU-decoded JPEG 2000 frame "
                                          f"({_dali_reason(e)})")
        return True

    def _pipeline(self, key: _Key) -> Any:
        pipe = self._pipes.get(key)
        if pipe is None:
            encoded, dtype_name, clip = key
            cpu = self.device == Device.CPU
            pipe = _graph()(
                encoded=encoded, device="cpu" if cpu else "gpu", dtype_name=dtype_name, clip=clip,
                input_hw=self.input_hw, fill=self._fill, hw_decoder_load=self.hw_decoder_load,
                batch_size=self.batch_size, num_threads=self.num_threads,
                device_id=None if cpu else self.device_id, prefetch_queue_depth=1,
            )
            pipe.build()
            self._pipes[key] = pipe
        return pipe

    def _run_chunk(self, key: _Key, chunk, transforms, outputs, errors) -> None:
        encoded, dtype_name, clip = key
        pipe = self._pipeline(key)
        H, W = self.input_hw
        f32 = np.float32
        feeds: dict[str, list[np.ndarray]] = {n: [] for n in ("size", "shift", "scale", "pos_y", "pos_x")}
        for job in chunk:
            t = transforms[job.pos]
            (nh, nw), (top, left) = t.resized_hw, t.offset_yx
            lo, hi = job.value_range
            feeds["size"].append(np.array([nh, nw], dtype=f32))
            feeds["shift"].append(np.array(lo + self.mean * (hi - lo), dtype=f32))
            feeds["scale"].append(np.array((hi - lo) * self.std, dtype=f32))
            # a crop (fit="center_crop": nh > H, top < 0) gives the same anchor round(pos * (nh - H)) = -top
            feeds["pos_y"].append(np.array(top / (H - nh) if H != nh else 0.0, dtype=f32))
            feeds["pos_x"].append(np.array(left / (W - nw) if W != nw else 0.0, dtype=f32))
        if not encoded:
            feeds["roi_end"] = [np.array(job.extent, dtype=f32) for job in chunk]
        if clip:
            feeds["clip_lo"] = [np.array(job.clip[0], dtype=f32) for job in chunk]
            feeds["clip_hi"] = [np.array(job.clip[1], dtype=f32) for job in chunk]
            feeds["unscale"] = [np.array(job.unscale, dtype=f32) for job in chunk]
        pipe.feed_input("data", [job.data for job in chunk])
        for name, vals in feeds.items():
            pipe.feed_input(name, vals)
        res = pipe.run()
        out, shapes = res if encoded else (res[0], None)
        if self.device == Device.CPU:
            arr: Any = out.as_array()  # (n, 1, H, W) numpy, a copy owned by us
        else:  # stays on the GPU: copied device-to-device (DALI reuses its buffer next run)
            import torch
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dev = torch.device("cuda", self.device_id)
            dense = out.as_tensor()  # (n, 1, H, W) DALI TensorGPU
            with torch.cuda.device(dev):
                cur, side = torch.cuda.current_stream(dev), self._copy_stream()
                arr = torch.empty(tuple(dense.shape()), dtype=torch.float32, device=dev)
                side.wait_stream(cur)
                # copy on the preprocessor's own stream; DALI orders it after the pipeline's work
                feed_ndarray(dense, arr, cuda_stream=side)
                arr.record_stream(side)
        for row, job in enumerate(chunk):
            if encoded:
                hw = tuple(int(v) for v in np.asarray(shapes[row])[:2])
                if hw != transforms[job.pos].src_hw:
                    errors[job.pos] = DecodeError(
                        job.source, f"decoded size {hw} differs from the header size "
                        f"{transforms[job.pos].src_hw} reported by cxrkit.io",
                    )
                    continue
            outputs[job.pos] = arr[row]
