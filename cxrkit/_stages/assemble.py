"""Stage 5, assemble: one Prediction per item of a chunk, in input order.

A Prediction of an inferred item is a view: ``findings`` reads row r of its slice's
:class:`~cxrkit.results.BatchColumns` (Findings are made when a key is touched), ``heatmaps`` is
row r of the batch's heatmaps. Items that failed anywhere get their typed error; per-stage batch
timings are shared out over the inferred items, as before.
"""

from __future__ import annotations

from typing import Any

from ..errors import BackendError
from ..io.sources import describe_item
from ..results import Prediction, _FindingsView, _prediction
from .infer import Inferred
from .prepare import Prepared

__all__ = ["assemble"]


def assemble(prep: Prepared, inferred: Inferred | None, model: str) -> list[Prediction]:
    read = prep.read
    errors = read.errors
    views: dict[int, tuple[Any, int]] = {}  # position -> (columns, row in them)
    stage_ms: dict[str, float] = {}
    if inferred is not None:
        ok = prep.ok
        for start, cols in inferred.parts:
            for r in range(len(cols)):
                views[ok[start + r]] = (cols, r)
        for r, err in inferred.errors.items():
            errors[ok[r]] = err
        n_done = max(1, len(views))
        stage_ms = {"infer": inferred.infer_ms / n_done, "postprocess": inferred.postprocess_ms / n_done,
                    "preprocess": prep.preprocess_ms / n_done}
    out = []
    for pos, (index, item) in enumerate(read.chunk):
        img = read.loaded[pos]
        v = views.get(pos)
        if v is None:  # failed: reading, preprocessing, or inference
            err = errors.get(pos) or BackendError(f"input #{index} got no result (neither read, preprocessed "
                                                  "nor inferred); please report this")
            source = img.source if img is not None else getattr(err, "source", None) or describe_item(item, index)
            out.append(_prediction(source, index, {}, img.image_size if img is not None else None, err, None,
                                   {"load": read.load_ms[pos]}, dict(img.meta) if img is not None else {}, (), model))
            continue
        cols, r = v
        timings = {"load": read.load_ms[pos]}
        timings.update(stage_ms)
        out.append(_prediction(img.source, index, _FindingsView(cols, r), img.image_size, None,
                               None if cols.heatmaps is None else cols.heatmaps[r], timings, dict(img.meta),
                               tuple(img.warnings), model))
    return out
