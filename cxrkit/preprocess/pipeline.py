"""Preprocessing: LoadedImage -> normalised letterboxed (N, 1, H, W) float32 model input.

One DALI ``@pipeline_def`` graph, built in two variants by ``encoded``:

- encoded: JPEG / PNG bytes -> ``fn.decoders.image(output_type=GRAY)`` (``device="mixed"`` on a
  GPU, ``"cpu"`` here). ``dtype`` is UINT8 for JPEG and 8-bit PNG and UINT16 for 16-bit PNG: the
  decoder's default UINT8 would rescale a 16-bit PNG to 8 bits (it converts to the dynamic range
  of the requested type, 33375 -> 130), so 16-bit PNGs get their own UINT16 variant.
- raw: (h, w) arrays that cxrkit.io decoded (DICOM pixels, PNGs DALI cannot decode, ...).

Both then run ``fn.resize`` (antialiased linear, to the per-sample (nh, nw) that
:func:`letterbox_geometry` decided in Python, float32 output) and ``fn.crop_mirror_normalize``,
which in one pass applies the per-sample value range and the model normalisation as one affine
map, pads to (H, W) at the letterbox offset with the normalised padding value, and writes CHW.
The value range is applied after the resize (see reference.py: resizing is linear, weights sum to
1), so the full-resolution image is never converted to float. The numpy path
(:func:`preprocess_reference`) computes the same function and is the fallback without DALI.
"""

from __future__ import annotations

import functools
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

from cxrkit.config import Device, device_index
from cxrkit.errors import BackendUnavailableError, DecodeError, InputError
from cxrkit.preprocess.letterbox import LetterboxTransform, letterbox_geometry
from cxrkit.preprocess.reference import (
    check_value_range,
    clip_to_range,
    pad_value,
    preprocess_reference,
)

__all__ = ["Preprocessor", "PreprocessResult", "dali_available"]

_log = logging.getLogger(__name__)

DALI_INSTALL_HINT = "pip install nvidia-dali-cuda130  (or: pip install 'cxrkit[dali]')"
HW_DECODER_LOAD = 0.75  # share of JPEGs sent to the NVJPG engines on device="mixed"; tune on the GPU
_RAW_DTYPES = (np.uint8, np.uint16, np.float32)  # raw dtypes fed as is; others go as float32
_warned_no_dali = False


@dataclass
class PreprocessResult:
    batch: Any  # (N_ok, 1, H, W) float32: np.ndarray on CPU, torch CUDA tensor on device="cuda"
    transforms: list[LetterboxTransform]  # one per ok item, same order as batch rows
    ok_positions: list[int]  # positions in `images` that made it into `batch`, ascending
    errors: dict[int, InputError] = field(default_factory=dict)  # position -> typed error
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

    @pipeline_def
    def cxr_preprocess(
        encoded: bool, device: str, dtype_name: str, input_hw: tuple[int, int], fill: float
    ):
        decoder_device = "cpu" if device == "cpu" else "mixed"
        dtype = {"uint8": types.UINT8, "uint16": types.UINT16, "float32": types.FLOAT}[dtype_name]
        if encoded:
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)  # file bytes
            hw = {} if decoder_device == "cpu" else {"hw_decoder_load": HW_DECODER_LOAD}
            img = fn.decoders.image(
                data, device=decoder_device, output_type=types.GRAY, dtype=dtype,
                adjust_orientation=False, **hw,
            )  # (h, w, 1)
            shape = fn.peek_image_shape(data, adjust_orientation=False)  # (3,) h, w, c from header
        else:
            img = fn.external_source(name="data", dtype=dtype, ndim=3, layout="HWC")  # (h, w, 1)
            if device != "cpu":
                img = img.gpu()
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)  # (2,) nh, nw
        shift = fn.external_source(name="shift", dtype=types.FLOAT, ndim=0)  # lo + mean * (hi - lo)
        scale = fn.external_source(name="scale", dtype=types.FLOAT, ndim=0)  # (hi - lo) * std
        pos_y = fn.external_source(name="pos_y", dtype=types.FLOAT, ndim=0)  # top / (H - nh)
        pos_x = fn.external_source(name="pos_x", dtype=types.FLOAT, ndim=0)  # left / (W - nw)
        resized = fn.resize(
            img, size=size, dtype=types.FLOAT, interp_type=types.INTERP_LINEAR, antialias=True
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


def _raw_pixels(img: Any) -> tuple[np.ndarray, tuple[float, float]]:
    """(h, w) pixels of `img` and their value range, decoding its bytes with Pillow (cxrkit.io)
    if needed (decoding may change the value range, e.g. a 16-bit colour PNG read at 8 bits)."""
    if img.pixels is None:
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


class _Job(NamedTuple):  # one item on its way through a DALI pipeline variant
    pos: int
    source: str
    format: str
    data: np.ndarray  # (n_bytes,) uint8 file bytes, or (h, w, 1) pixels
    value_range: tuple[float, float]


class Preprocessor:
    """Runs preprocessing for batches of LoadedImage; one instance per device, not thread-safe."""

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
    ) -> None:
        global _warned_no_dali
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.mean, self.std = float(mean), float(std)
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        if batch_size < 1 or num_threads < 1:
            raise ValueError(f"batch_size and num_threads must be >= 1, got {batch_size}, {num_threads}")
        self.device = Device.parse(device)
        self.device_id = device_id if device_id is not None else max(0, device_index(str(device)))
        self.batch_size, self.num_threads = int(batch_size), int(num_threads)
        if backend not in ("auto", "dali", "numpy"):
            raise ValueError(f"backend must be 'auto', 'dali' or 'numpy', got {backend!r}")
        if backend == "auto":
            backend = "dali" if dali_available() else "numpy"
            if backend == "numpy" and not _warned_no_dali:
                _warned_no_dali = True
                _log.warning(
                    "NVIDIA DALI is not installed: preprocessing uses the slower numpy path. "
                    "Install it with: %s", DALI_INSTALL_HINT,
                )
        elif backend == "dali":
            _graph()  # raises BackendUnavailableError with the pip command
        self.backend = backend
        self._fill = pad_value(self.mean, self.std)
        self._pipes: dict[tuple[bool, str], Any] = {}

    # -- public -------------------------------------------------------------------------------
    def run(self, images: Sequence[Any]) -> PreprocessResult:
        t0 = time.perf_counter()
        outputs: dict[int, np.ndarray] = {}  # position -> (1, H, W)
        transforms: dict[int, LetterboxTransform] = {}
        errors: dict[int, InputError] = {}
        timings = {"prepare": 0.0, "pipeline": 0.0}
        if self.backend == "numpy":
            self._run_numpy(images, outputs, transforms, errors, timings)
        else:
            self._run_dali(images, outputs, transforms, errors, timings)
        ok = sorted(outputs)
        batch = self._assemble([outputs[p] for p in ok])  # (N_ok, 1, H, W)
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return PreprocessResult(batch, [transforms[p] for p in ok], ok, errors, timings)

    def _assemble(self, rows: list[Any]) -> Any:
        H, W = self.input_hw
        on_gpu = self.device == Device.CUDA
        if on_gpu and self.backend == "dali":
            import torch

            if rows:
                return torch.stack(rows)  # (N_ok, 1, H, W) CUDA
            return torch.empty((0, 1, H, W), dtype=torch.float32, device=f"cuda:{self.device_id}")
        batch = np.empty((len(rows), 1, H, W), dtype=np.float32)  # (N_ok, 1, H, W)
        for row, arr in enumerate(rows):
            batch[row] = arr
        if on_gpu:  # numpy path on a CUDA device: one upload of the finished batch
            import torch

            return torch.from_numpy(batch).to(f"cuda:{self.device_id}")
        return batch

    def close(self) -> None:
        self._pipes.clear()

    def __enter__(self) -> "Preprocessor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- numpy path ---------------------------------------------------------------------------
    def _run_numpy(self, images, outputs, transforms, errors, timings) -> None:
        t0 = time.perf_counter()
        for pos, img in enumerate(images):
            try:
                px, vr = _raw_pixels(img)
                outputs[pos], transforms[pos] = preprocess_reference(
                    px, vr, self.input_hw, self.mean, self.std
                )
            except InputError as e:
                errors[pos] = e
            except ValueError as e:
                errors[pos] = InputError(img.source, str(e))
        timings["pipeline"] = (time.perf_counter() - t0) * 1e3

    # -- DALI path ----------------------------------------------------------------------------
    def _run_dali(self, images, outputs, transforms, errors, timings) -> None:
        t0 = time.perf_counter()
        groups: dict[tuple[bool, str], list[_Job]] = {}  # variant (encoded, dtype) -> jobs
        for pos, img in enumerate(images):
            try:
                vr = check_value_range(img.value_range, img.source)
                enc_dtype = _encoded_dtype(img)
                if enc_dtype is not None:
                    data = np.frombuffer(img.encoded, dtype=np.uint8)  # (n_bytes,)
                    src_hw = (int(img.image_size[0]), int(img.image_size[1]))
                    key = (True, enc_dtype)
                else:
                    px, vr = _raw_pixels(img)
                    px = clip_to_range(px, vr)  # (h, w)
                    if px.dtype not in _RAW_DTYPES:
                        px = px.astype(np.float32)
                    data, src_hw = px[:, :, None], px.shape  # (h, w, 1)
                    key = (False, px.dtype.name)
                transforms[pos] = letterbox_geometry(src_hw, self.input_hw)
            except InputError as e:
                errors[pos] = e
                continue
            except ValueError as e:
                errors[pos] = InputError(img.source, str(e))
                continue
            groups.setdefault(key, []).append(_Job(pos, img.source, img.format, data, vr))
        t1 = time.perf_counter()
        timings["prepare"] = (t1 - t0) * 1e3

        for key, jobs in groups.items():
            for i in range(0, len(jobs), self.batch_size):
                chunk = jobs[i : i + self.batch_size]
                try:
                    self._run_chunk(key, chunk, transforms, outputs, errors)
                except Exception as e:  # a bad item spoils the DALI batch: find it, keep the rest
                    _log.info("DALI batch of %d failed (%s); retrying one by one", len(chunk),
                              str(e).splitlines()[0] if str(e) else type(e).__name__)
                    self._pipes.pop(key, None)  # rebuild: a failed pipeline may be unusable
                    for one in chunk:
                        try:
                            self._run_chunk(key, [one], transforms, outputs, errors)
                        except Exception as e1:
                            self._pipes.pop(key, None)
                            errors[one.pos] = DecodeError(
                                one.source, f"DALI could not decode this {one.format} image "
                                f"({_dali_reason(e1)}); the file is corrupt or truncated, or "
                                "uses a variant DALI does not read",
                            )
        for pos in errors:
            transforms.pop(pos, None)
        timings["pipeline"] = (time.perf_counter() - t1) * 1e3

    def _pipeline(self, key: tuple[bool, str]) -> Any:
        pipe = self._pipes.get(key)
        if pipe is None:
            encoded, dtype_name = key
            cpu = self.device == Device.CPU
            pipe = _graph()(
                encoded=encoded, device="cpu" if cpu else "gpu", dtype_name=dtype_name,
                input_hw=self.input_hw, fill=self._fill,
                batch_size=self.batch_size, num_threads=self.num_threads,
                device_id=None if cpu else self.device_id, prefetch_queue_depth=1,
            )
            pipe.build()
            self._pipes[key] = pipe
        return pipe

    def _run_chunk(self, key, chunk, transforms, outputs, errors) -> None:
        encoded = key[0]
        pipe = self._pipeline(key)
        H, W = self.input_hw
        size, shift, scale, pos_y, pos_x = [], [], [], [], []
        for job in chunk:
            t = transforms[job.pos]
            (nh, nw), (top, left) = t.resized_hw, t.offset_yx
            lo, hi = job.value_range
            size.append(np.array([nh, nw], dtype=np.float32))
            shift.append(np.array(lo + self.mean * (hi - lo), dtype=np.float32))
            scale.append(np.array((hi - lo) * self.std, dtype=np.float32))
            pos_y.append(np.array(top / (H - nh) if H > nh else 0.0, dtype=np.float32))
            pos_x.append(np.array(left / (W - nw) if W > nw else 0.0, dtype=np.float32))
        pipe.feed_input("data", [job.data for job in chunk])
        for name, vals in (("size", size), ("shift", shift), ("scale", scale),
                           ("pos_y", pos_y), ("pos_x", pos_x)):
            pipe.feed_input(name, vals)
        res = pipe.run()
        out, shapes = res if encoded else (res[0], None)
        if self.device == Device.CPU:
            arr: Any = out.as_array()  # (n, 1, H, W) numpy, a copy owned by us
        else:  # stays on the GPU: copied device-to-device (DALI reuses its buffer next run)
            import torch
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()  # (n, 1, H, W) DALI TensorGPU
            arr = torch.empty(tuple(dense.shape()), dtype=torch.float32,
                              device=f"cuda:{self.device_id}")
            feed_ndarray(dense, arr, cuda_stream=torch.cuda.current_stream(arr.device))
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
