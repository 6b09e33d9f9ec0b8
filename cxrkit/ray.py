"""Predict a whole dataset on a Ray cluster: one Detector per actor, results streamed to files.

Needs the ``ray`` extra (``pip install 'cxrkit[ray]'``); ``import cxrkit.ray`` works without it and
``predict_dataset`` says what to install.

>>> import ray, cxrkit.ray                                           # doctest: +SKIP
>>> ray.init(address="auto")                # or nothing: a local cluster on this machine
>>> cxrkit.ray.predict_dataset(paths, model="cxr29-demo", num_gpus_per_actor=1, concurrency=8,
...                            output="preds.parquet")               # doctest: +SKIP

Each output row holds one input: ``index`` (its position when a list or folder was given, or the
input dataset's ``index`` column; null otherwise), ``source``, ``ok``, ``error``
(``"DecodeError: ..."`` or null) and ``prediction`` (``Prediction.to_json()``, the content of
``json.dumps(Prediction.to_dict())``). A bad input gives an error row; the job goes on. Rows come
back in no fixed order: sort on ``index``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .batching import restamp
from .errors import BackendError, BackendUnavailableError
from .results import Prediction, dumps_json

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow
    import ray.data

__all__ = ["predict_dataset", "DetectorActor", "OUTPUT_COLUMNS"]

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("index", "source", "ok", "error", "prediction")
_INPUT_COLUMNS = ("bytes", "path", "item", "image")
_PIP = "pip install 'cxrkit[ray]'  (or: pip install 'ray[data]>=2.9' pyarrow)"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"cxrkit.ray needs Ray Data, which is not installed ({e}); run: {_PIP}") from e
    return ray


def _output_schema():
    import pyarrow as pa

    return pa.schema([("index", pa.int64()), ("source", pa.string()), ("ok", pa.bool_()),
                      ("error", pa.string()), ("prediction", pa.string())])


class DetectorActor:
    """The map_batches callable: builds its Detector once (per actor), then maps Arrow batches of
    inputs to Arrow batches of ``OUTPUT_COLUMNS``.

    ``model``: a name or path for ``Detector.from_pretrained``, or a zero-argument callable that
    returns a detector (anything with ``predict(inputs, batch_size=...)``).
    """

    def __init__(self, model: "str | Callable[[], Any]", input_column: str, source_column: str | None,
                 batch_size: int, device: str, detector_kwargs: dict[str, Any]) -> None:
        if callable(model):
            self.detector = model()
        else:
            from .api import Detector

            self.detector = Detector.from_pretrained(model, device=device, batch_size=batch_size, **detector_kwargs)
        self.input_column = input_column
        self.source_column = source_column
        self.batch_size = batch_size

    def __call__(self, batch: "pyarrow.Table") -> "pyarrow.Table":
        import pyarrow as pa

        items = batch.column(self.input_column).to_pylist()
        n = len(items)
        indices = batch.column("index").to_pylist() if "index" in batch.column_names else [None] * n
        names = batch.column(self.source_column).to_pylist() if self.source_column else [None] * n
        try:
            preds = list(self.detector.predict(items, batch_size=self.batch_size))
            if len(preds) != n:
                raise BackendError(f"detector returned {len(preds)} predictions for {n} inputs")
        except Exception as e:  # noqa: BLE001 - a failed batch becomes error rows, never a failed job
            log.exception("batch of %d failed", n)
            err = BackendError(f"the detector failed on a batch of {n} inputs: {type(e).__name__}: {e}")
            preds = [Prediction(source=str(names[i] or f"<input #{i}>"), index=i, error=err) for i in range(n)]
        sources: list[str] = []
        errors: list[str | None] = []
        docs: list[str] = []
        for pos, p in enumerate(preds):
            idx = indices[pos]
            p = restamp(p, pos, index=0 if idx is None else int(idx),
                        source=None if names[pos] is None else str(names[pos]))
            sources.append(p.source)
            errors.append(None if p.error is None else f"{type(p.error).__name__}: {p.error}")
            if idx is None:
                d = p.to_dict()
                d["index"] = None
                docs.append(dumps_json(d).decode())
            else:
                docs.append(p.to_json().decode())  # from the batch's result columns; json.dumps(to_dict()) content
        cols = {"index": indices, "source": sources, "ok": [e is None for e in errors], "error": errors,
                "prediction": docs}
        return pa.Table.from_pydict(cols, schema=_output_schema())


def _list_folder(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def _as_dataset(ray: Any, ds_or_paths: Any) -> "ray.data.Dataset":
    if isinstance(ds_or_paths, ray.data.Dataset):
        return ds_or_paths
    if isinstance(ds_or_paths, (str, os.PathLike)):
        p = Path(ds_or_paths)
        items: Sequence[Any] = _list_folder(p) if p.is_dir() else [os.fspath(p)]
        if not items:
            raise ValueError(f"{os.fspath(p)!r} holds no files to predict")
    else:
        items = list(ds_or_paths)
    rows = []
    kinds = set()
    for i, x in enumerate(items):
        if isinstance(x, (str, os.PathLike)):
            rows.append({"index": i, "path": os.fspath(x)})
            kinds.add("path")
        elif isinstance(x, (bytes, bytearray, memoryview)):
            rows.append({"index": i, "bytes": bytes(x)})
            kinds.add("bytes")
        else:
            raise TypeError(f"input #{i} is a {type(x).__name__}; give paths or bytes (or a ray.data.Dataset "
                            "with a 'path' or 'bytes' column)")
    if len(kinds) > 1:
        raise TypeError("give either paths or bytes, not a mix (or a ray.data.Dataset with both a 'bytes' and a 'path' "
                        "column, e.g. ray.data.read_binary_files(..., include_paths=True))")
    return ray.data.from_items(rows)


def _pick_columns(ds: "ray.data.Dataset", column: str | None) -> tuple[str, str | None]:
    names = list(ds.schema().names)
    if column is None:
        column = next((c for c in _INPUT_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(f"the dataset has columns {names}; none is one of {list(_INPUT_COLUMNS)}: "
                             "pass column= to name the one holding paths or bytes")
    elif column not in names:
        raise ValueError(f"column {column!r} is not in the dataset's columns {names}")
    source = "path" if column != "path" and "path" in names else None
    return column, source


def _compute(ray: Any, concurrency: "int | tuple[int, int]") -> dict[str, Any]:
    if isinstance(concurrency, int):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        sizes = {"size": concurrency}
    else:
        lo, hi = concurrency
        sizes = {"min_size": int(lo), "max_size": int(hi)}
    try:  # Ray >= 2.10 spells the actor pool with compute=; older Ray with concurrency=
        return {"compute": ray.data.ActorPoolStrategy(**sizes)}
    except TypeError:
        return {"concurrency": concurrency}


def _prepare_output(output: str | os.PathLike, overwrite: bool) -> tuple[str, str]:
    out = os.fspath(output)
    fmt = "jsonl" if out.endswith((".jsonl", ".json")) else "parquet"
    if "://" not in out:
        p = Path(out)
        if p.exists() and (p.is_file() or any(p.iterdir())):
            if not overwrite:
                raise FileExistsError(f"output {out!r} exists and is not empty; pass overwrite=True to replace it "
                                      "or choose another path")
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    return out, fmt


def predict_dataset(
    ds_or_paths: Any,
    model: "str | os.PathLike | Callable[[], Any]" = "cxr29-demo",
    *,
    num_gpus_per_actor: float = 0,
    num_cpus_per_actor: float = 1,
    concurrency: "int | tuple[int, int]" = 1,
    batch_size: int = 32,
    device: str | None = None,
    output: "str | os.PathLike | None" = None,
    overwrite: bool = False,
    column: str | None = None,
    detector_kwargs: dict[str, Any] | None = None,
) -> "ray.data.Dataset":
    """Map inputs through a pool of Detector actors; returns a ``ray.data.Dataset`` of result rows.

    ``ds_or_paths``: a list of paths (each actor reads them: they must be visible from every node),
    a list of bytes, a folder (every file under it, sorted), or a ``ray.data.Dataset`` with a
    ``bytes``, ``path``, ``item`` or ``image`` column (or name it with ``column=``); with both
    ``bytes`` and ``path`` (``ray.data.read_binary_files(..., include_paths=True)``) the path names
    each row.
    ``model``: a model name or path, or a zero-argument callable returning a detector.
    ``num_gpus_per_actor``: 1 for one GPU per actor (``device`` then defaults to ``"cuda"``: Ray
    gives each actor its own GPU as device 0). ``concurrency``: actors in the pool, e.g. the number
    of GPUs in the cluster, or ``(min, max)`` to autoscale. ``batch_size``: images per batch.
    ``output``: None returns the lazy dataset (it runs when consumed); ``"x.parquet"`` or a folder
    writes Parquet, ``"x.jsonl"`` JSON lines; Ray writes a folder of part files at that path, as
    the rows stream out, and the returned dataset reads them back (so inference is not re-run).
    """
    ray = _import_ray()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_gpus_per_actor < 0 or num_cpus_per_actor < 0:
        raise ValueError("num_gpus_per_actor and num_cpus_per_actor must be >= 0")
    dev = device or ("cuda" if num_gpus_per_actor > 0 else "cpu")
    kwargs = dict(detector_kwargs or {})
    if dev == "cpu" and num_cpus_per_actor >= 1:
        kwargs.setdefault("num_threads", int(num_cpus_per_actor))
    if output is not None:
        out, fmt = _prepare_output(output, overwrite)
    ds = _as_dataset(ray, ds_or_paths)
    col, source_col = _pick_columns(ds, column)
    mdl: Any = model if callable(model) else os.fspath(model)
    result = ds.map_batches(
        DetectorActor,
        fn_constructor_kwargs={"model": mdl, "input_column": col, "source_column": source_col,
                               "batch_size": int(batch_size), "device": dev, "detector_kwargs": kwargs},
        batch_size=int(batch_size),
        batch_format="pyarrow",
        num_gpus=num_gpus_per_actor or None,
        num_cpus=num_cpus_per_actor,
        **_compute(ray, concurrency),
    )
    if output is None:
        return result
    if fmt == "jsonl":
        result.write_json(out)
        return ray.data.read_json(out)
    result.write_parquet(out)
    return ray.data.read_parquet(out)
