"""NIH ChestX-ray14 (``../shared/data/nih14``): records, the fixed patient-level split, the image cache.

    recs = load_nih14(root)                        # 939 records, labels/boxes mapped to the ontology
    split = load_or_make_split(recs, "models/cxr29-demo/split.json")   # {"train": [...], "val": [...]}
    cache = image_cache(recs, root, 384)           # (N, 384, 384) uint8 memmap, built once

The cache holds each image as the Detector feeds it (``preprocess_reference``: antialiased
letterbox to the model input, unit range), rounded to 8 bits, in a memmap under
``$CXRKIT_CACHE_DIR`` (default ``~/.cache/cxrkit``), never in the repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..labels import NIH14_TO_FINDING

log = logging.getLogger(__name__)

__all__ = ["Nih14Record", "load_nih14", "make_split", "load_or_make_split", "image_cache", "default_nih14_root",
           "NIH14_NAMES", "BOX_NAMES", "TRAINED_KEYS", "template_lungs"]

# The 14 NIH finding names (labels.json / CheXNet column order) and the 8 that have boxes.
NIH14_NAMES: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                                "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                                "Pleural_Thickening", "Hernia")
BOX_NAMES: tuple[str, ...] = NIH14_NAMES[:8]
# Ontology keys that real NIH labels supervise (13: Pneumonia and Consolidation share one).
TRAINED_KEYS: tuple[str, ...] = tuple(dict.fromkeys(NIH14_TO_FINDING[n] for n in NIH14_NAMES))


def default_nih14_root() -> Path:
    root = os.environ.get("CXRKIT_SHARED_DATA") or str(Path(__file__).resolve().parents[3] / "shared" / "data")
    return Path(root) / "nih14"


@dataclass
class Nih14Record:
    image: str
    patient: str
    view: str
    names: tuple[str, ...]  # NIH finding names, () for "No Finding"
    boxes: list[tuple[str, float, float, float, float]]  # (NIH name, x0, y0, x1, y1) in 1024^2 pixels
    chexnet: dict[str, float] | None  # CheXNet probability per NIH name, or None
    spacing_mm: float  # mm per pixel of the 1024^2 image
    size: tuple[int, int] = (1024, 1024)  # (w, h) of the distributed image
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> set[str]:
        """Ontology keys of the positive findings."""
        return {NIH14_TO_FINDING[n] for n in self.names}


def _box_name(label: str) -> str:
    return "Infiltration" if label == "Infiltrate" else label


def load_nih14(root: "str | Path | None" = None) -> list[Nih14Record]:
    """Read ``labels.json`` (the nih14 format, see its README) into records, in file order."""
    root = Path(root) if root is not None else default_nih14_root()
    path = root / "labels.json" if root.is_dir() else root
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not data or "image" not in data[0] or "labels" not in data[0]:
        raise ValueError(f"{str(path)!r}: not an nih14 labels.json (a list of records with 'image' and 'labels')")
    out = []
    for r in data:
        names = tuple(n for n in str(r["labels"]).split("|") if n and n != "No Finding")
        unknown = [n for n in names if n not in NIH14_TO_FINDING]
        if unknown:
            raise ValueError(f"{str(path)!r}: {r['image']}: unknown NIH finding names {unknown}")
        boxes = [(_box_name(b["label"]), float(b["bbox"][0]), float(b["bbox"][1]),
                  float(b["bbox"][0] + b["bbox"][2]), float(b["bbox"][1] + b["bbox"][3])) for b in r.get("boxes", [])]
        osz = r.get("original_size") or [1024, 1024]
        sp = float(r.get("original_pixel_spacing") or 0.143) * float(osz[0]) / 1024.0
        out.append(Nih14Record(r["image"], str(r["patient"]), str(r.get("view", "")), names, boxes,
                               r.get("chexnet_test_probs"), sp,
                               meta={k: r.get(k) for k in ("age", "sex") if k in r}))
    return out


def make_split(recs: Sequence[Nih14Record], fractions: Mapping[str, float] | None = None, seed: int = 0) -> dict[str, Any]:
    """A patient-level split: patients shuffled by ``seed``, each given to the part furthest below
    its share of images. Returns {"seed", "fractions", part: {"patients": [...], "images": [...]}}."""
    fractions = dict(fractions or {"train": 0.8, "val": 0.2})
    per: dict[str, list[str]] = {}
    for r in recs:
        per.setdefault(r.patient, []).append(r.image)
    patients = sorted(per)
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    total = len(recs)
    names = list(fractions)
    have = {n: 0 for n in names}
    parts: dict[str, list[str]] = {n: [] for n in names}
    for p in patients:
        n = max(names, key=lambda m: (fractions[m] * total - have[m]) / max(fractions[m] * total, 1e-9))
        parts[n].append(p)
        have[n] += len(per[p])
    return {"by": "patient", "seed": seed, "fractions": fractions,
            **{n: {"patients": sorted(parts[n], key=int if all(q.isdigit() for q in parts[n]) else str),
                   "images": sorted(i for p in parts[n] for i in per[p])} for n in names}}


def load_or_make_split(recs: Sequence[Nih14Record], path: "str | Path | None", seed: int = 0) -> dict[str, Any]:
    """The split recorded at ``path`` (checked against ``recs``), or a new one written there."""
    if path is not None and Path(path).is_file():
        split = json.loads(Path(path).read_text())
        known = {r.image for r in recs}
        for part in ("train", "val"):
            missing = [i for i in split[part]["images"] if i not in known]
            if missing:
                raise ValueError(f"{path}: split names {len(missing)} images not in the data, e.g. {missing[:3]}")
        a, b = set(split["train"]["patients"]), set(split["val"]["patients"])
        if a & b:
            raise ValueError(f"{path}: patients in both train and val: {sorted(a & b)[:5]}")
        return split
    split = make_split(recs, seed=seed)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(split, indent=1) + "\n")
    return split


def _cache_dir() -> Path:
    return Path(os.environ.get("CXRKIT_CACHE_DIR") or Path.home() / ".cache" / "cxrkit") / "nih14"


def image_cache(recs: Sequence[Nih14Record], root: "str | Path | None", size: int,
                cache_dir: "str | Path | None" = None) -> np.ndarray:
    """(N, size, size) uint8 memmap of the records' images as the Detector's preprocessing makes
    them (antialiased letterbox, unit range x 255, rounded); built on first use."""
    from PIL import Image

    from ..preprocess.reference import preprocess_reference

    root = Path(root) if root is not None else default_nih14_root()
    names = [r.image for r in recs]
    tag = hashlib.sha256(("\n".join(names) + f"|{size}|v1").encode()).hexdigest()[:12]
    d = Path(cache_dir) if cache_dir is not None else _cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"nih14-{size}-{len(names)}-{tag}.u8"
    shape = (len(names), size, size)
    if path.is_file() and path.stat().st_size == int(np.prod(shape)):
        return np.memmap(path, np.uint8, "r", shape=shape)
    log.info("building the nih14 image cache %s (%d images at %d^2)", path, len(names), size)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    mm = np.memmap(tmp, np.uint8, "w+", shape=shape)
    for i, name in enumerate(names):
        with Image.open(root / "images" / name) as im:
            arr = np.asarray(im.convert("L"))
        x, _ = preprocess_reference(arr, (0.0, 255.0), (size, size), 0.0, 1.0)  # (1, S, S) unit
        mm[i] = np.round(np.clip(x[0], 0, 1) * 255.0).astype(np.uint8)
    mm.flush()
    del mm
    os.replace(tmp, path)
    return np.memmap(path, np.uint8, "r", shape=shape)


def template_lungs(size: int) -> np.ndarray:
    """Approximate lung boxes (image-left lung first) for a frontal NIH film letterboxed to size^2:
    the synthetic-nodule renderers place lesions inside them, avoiding bright (dense) spots."""
    return np.array([[0.13, 0.14, 0.47, 0.72], [0.53, 0.14, 0.87, 0.72]], np.float32) * float(size)
