"""The TensorRT engine cache: keyed, locked, written atomically, validated before every load.

Layout: ``$CXRKIT_CACHE_DIR/engines/`` (default ``~/.cache/cxrkit/engines``), per entry
``<model>-<precision>-<key16>.engine``, a JSON sidecar ``<...>.engine.json`` holding the key
fields and the engine's sha256, and ``<...>.lock`` for ``fcntl.flock``.

The key is a sha256 over everything that makes an engine valid: the model package's content
hash and the graph's sha256, the TensorRT version, the GPU name and compute capability, the
precision, the input size and the batch profile. An entry is used only if its sidecar matches
the key field by field, the engine file matches the sidecar's sha256, and the caller's ``load``
(deserialization) succeeds; anything else is rebuilt and replaced, never loaded.

Pure Python: no tensorrt here, so all of this is tested on any machine with a fake builder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ...errors import BackendError

__all__ = ["EngineKey", "EngineCache", "default_cache_dir"]

log = logging.getLogger(__name__)

T = TypeVar("T")
SIDECAR_VERSION = 1


def default_cache_dir() -> Path:
    """``$CXRKIT_CACHE_DIR/engines``, else ``$XDG_CACHE_HOME/cxrkit/engines``, else ``~/.cache/cxrkit/engines``."""
    root = os.environ.get("CXRKIT_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "engines"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cxrkit" / "engines"


@dataclass(frozen=True)
class EngineKey:
    model_name: str
    model_hash: str  # ModelPackage.content_hash
    graph_sha256: str  # the ONNX graph the engine is built from
    precision: str  # fp32 | fp16 | int8
    input_hw: tuple[int, int]
    profile: tuple[int, int, int]  # (min, opt, max) batch
    trt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def fields(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_hw"] = list(self.input_hw)
        d["profile"] = list(self.profile)
        return d

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()

    @property
    def stem(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model_name)
        return f"{safe}-{self.precision}-{self.digest[:16]}"


class EngineCache:
    def __init__(self, root: "str | Path | None" = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def paths(self, key: EngineKey) -> tuple[Path, Path, Path]:
        """(engine, sidecar, lock) paths of ``key``."""
        e = self.root / f"{key.stem}.engine"
        return e, e.with_name(e.name + ".json"), self.root / f"{key.stem}.lock"

    @contextlib.contextmanager
    def lock(self, key: EngineKey) -> Iterator[None]:
        """Exclusive lock on ``key`` across processes (one builder at a time per engine)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _, _, lock_path = self.paths(key)
        with open(lock_path, "a+") as f:
            t0 = time.monotonic()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            waited = time.monotonic() - t0
            if waited > 1.0:
                log.info("waited %.1f s for the engine lock %s (another process was building it)", waited, lock_path.name)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def read_valid(self, key: EngineKey) -> bytes | None:
        """The cached engine bytes if the entry is complete and matches ``key``; else None (and why, logged)."""
        engine, sidecar, _ = self.paths(key)
        if not engine.is_file() or not sidecar.is_file():
            return None
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            log.warning("engine cache: unreadable sidecar %s (%s); rebuilding", sidecar.name, e)
            return None
        want = {"sidecar_version": SIDECAR_VERSION, "key": key.digest, **key.fields()}
        diff = sorted(k for k, v in want.items() if meta.get(k) != v)
        if diff:
            log.warning("engine cache: %s does not match its key (%s); rebuilding", engine.name, ", ".join(diff))
            return None
        data = engine.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != meta.get("engine_sha256") or len(data) != meta.get("engine_bytes"):
            log.warning("engine cache: %s is corrupt (sha256 %s…, sidecar says %s…); rebuilding",
                        engine.name, got[:12], str(meta.get("engine_sha256"))[:12])
            return None
        return data

    def write(self, key: EngineKey, data: bytes) -> Path:
        """Write engine then sidecar, each through a temp file and ``os.replace`` (call under :meth:`lock`)."""
        engine, sidecar, _ = self.paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"sidecar_version": SIDECAR_VERSION, "key": key.digest, **key.fields(),
                "engine_sha256": hashlib.sha256(data).hexdigest(), "engine_bytes": len(data),
                "created_unix": int(time.time())}
        # the sidecar goes first out of the way: a reader never pairs a new engine with an old sidecar
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
        _atomic_write(engine, data)
        _atomic_write(sidecar, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return engine

    def remove(self, key: EngineKey) -> None:
        engine, sidecar, _ = self.paths(key)
        for p in (sidecar, engine):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes], load: Callable[[bytes], T],
                     rebuild: bool = False) -> tuple[T, bool]:
        """``(load(engine bytes), built)``: the cached engine if valid and loadable, else a fresh build.

        ``load`` must raise or return None for an engine it cannot use (e.g. deserialization fails);
        such an entry is rebuilt. A fresh build that ``load`` rejects raises BackendError.
        """
        with self.lock(key):
            if not rebuild:
                data = self.read_valid(key)
                if data is not None:
                    try:
                        obj = load(data)
                    except Exception as e:  # a TensorRT deserialization error, whatever its type
                        log.warning("engine cache: %s failed to load (%s); rebuilding", key.stem, e)
                        obj = None
                    if obj is not None:
                        log.info("engine cache hit: %s", key.stem)
                        return obj, False
                    self.remove(key)
            log.info("building engine %s", key.stem)
            t0 = time.perf_counter()
            data = build()
            if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
                raise BackendError(f"engine build for {key.model_name} ({key.precision}) produced no engine")
            data = bytes(data)
            self.write(key, data)
            log.info("built %s in %.1f s (%d MiB)", key.stem, time.perf_counter() - t0, len(data) >> 20)
            try:
                obj = load(data)
            except Exception as e:
                raise BackendError(f"a freshly built engine for {key.model_name} ({key.precision}) does not load: {e}") from e
            if obj is None:
                raise BackendError(f"a freshly built engine for {key.model_name} ({key.precision}) does not load")
            return obj, True


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
