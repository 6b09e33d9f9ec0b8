"""Does the GPU check have every module it imports? Run HERE, before a GPU session, not on the GPU machine.

The GPU machine (../shared/GPU.md) has Python 3.12 with torch, torchvision, CuPy, numpy, Pillow,
OpenCV, pybind11, pytest, pytest-benchmark, Triton and nothing else; cxrkit's other dependencies
travel as wheels under .device/ (benchmarks/README.md, "Running the GPU check"). This script:

1. collects, by reading the code (not a hand-kept list), every module that benchmarks/device_check.sh
   will import: the test files it runs (tests with a gpu marker, found by grep as device_check.sh does, plus the
   helpers and conftest they import), the benchmark scripts it runs, and, recursively, every
   cxrkit module those reach, with imports inside functions included (cxrkit imports its heavy
   dependencies lazily, so a top-level scan would miss e.g. safetensors in nets/weights.py);
   cxrkit modules the GPU check never reaches (serve, ray, training, ...: OFF_PATH) are not followed;
2. builds a fresh venv holding only approximations of the GPU machine's packages (CPU
   torch==2.13.0 from the local wheel, numpy, Pillow, pytest, pytest-benchmark, pybind11, and
   cupy-cuda13x if it installs) plus exactly the carried wheels: the DALI parts reassembled as
   device_check.sh does, and .device/extras; a carried wheel built for another Python (cp312
   here on 3.11) is replaced by the same project and version for this Python;
3. imports every third-party module found and every cxrkit module reached in that venv, and runs
   ``pytest --collect-only`` over the GPU test files there.

It fails (exit 1) naming each missing module, where it is imported (file:line) and whether the
import is guarded (an optional path then silently skips or falls back: still reported, since a
skipped GPU test wastes the run). Modules the GPU machine has but this CPU box cannot install
(torchvision beside torch 2.13, triton, cv2) count as present.

    python benchmarks/check_device_wheels.py            # uses .device/ as the README's recipe fills it
    python benchmarks/check_device_wheels.py --list     # only print the collected import set
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / ".device"

# On the GPU machine already (GPU.md), by import name.
GPU_MACHINE_HAS = {"torch", "torchvision", "cupy", "cupyx", "cupy_backends", "numpy", "PIL", "cv2", "pybind11",
                   "pytest", "pytest_benchmark", "triton", "_pytest"}
# Installed into the check venv as stand-ins for those (pip names); torch comes from the local wheel.
STAND_INS = ["numpy", "pillow", "pytest", "pytest-benchmark", "pybind11"]
# cxrkit modules the GPU check does not run (their imports are not needed there).
OFF_PATH = ("cxrkit.serve", "cxrkit.ray", "cxrkit.training", "cxrkit.train", "cxrkit.tune", "cxrkit.synth",
            "cxrkit.dicom", "cxrkit.convert", "cxrkit.eval", "cxrkit.evaluate", "cxrkit.eval_nih14",
            "cxrkit.quant", "cxrkit.nets.onnx_export", "cxrkit.nets.cam", "cxrkit.cli", "cxrkit.bench",
            "cxrkit.overlay", "cxrkit.backends.tensorrt")
# Third-party modules that are absent on the GPU machine by design, with why.
NOT_ON_GPU_MACHINE = {
    "tensorrt": "TensorRT comes only from NVIDIA's own index (GPU.md); trt tests skip",
    "onnxruntime": "the CPU runner; on CUDA the torch runner is used (auto falls through)",
    "imagecodecs": "cxrkit[fast] J2K CPU decode; the GPU decodes J2K with nvJPEG2000, pydicom's plugins otherwise",
    "pyarrow": "Parquet output (cxrkit.ray, model conversion); the tests that need it importorskip it",
}

# Import name -> the project the README's recipe downloads for it (tests keep the two in step).
IMPORT_TO_PROJECT = {"nvidia.dali": "nvidia-dali-cuda130", "safetensors": "safetensors", "pydicom": "pydicom",
                     "jsonschema": "jsonschema", "pylibjpeg": "pylibjpeg", "openjpeg": "pylibjpeg-openjpeg",
                     "libjpeg": "pylibjpeg-libjpeg", "isal": "isal", "orjson": "orjson",
                     "threadpoolctl": "threadpoolctl"}

_MARKER = re.compile(r"pytest\.mark\.gpu\b")  # as device_check.sh selects files (grep -lE pytest.mark.gpu)


@dataclass
class Use:
    where: str  # file:line
    guarded: bool  # inside try/except ImportError, or pytest.importorskip


@dataclass
class Found:
    third_party: dict[str, list[Use]] = field(default_factory=dict)
    cxrkit_modules: set[str] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)


def gpu_test_files() -> list[Path]:
    """The test files device_check.sh runs: those with a gpu marker (its `grep -lE` selection)."""
    return sorted(p for p in (ROOT / "tests").glob("test_*.py") if _MARKER.search(p.read_text(errors="replace")))


def device_check_scripts() -> list[Path]:
    text = (ROOT / "benchmarks" / "device_check.sh").read_text()
    return sorted({ROOT / rel for rel in re.findall(r"benchmarks/[\w]+\.py", text)})


def _module_file(mod: str) -> Path | None:
    parts = mod.split(".")
    base = ROOT.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _guarded(node: ast.AST, parents: dict) -> bool:
    cur = parents.get(node)
    while cur is not None:
        if isinstance(cur, ast.Try):
            for h in cur.handlers:
                names = []
                t = h.type
                if t is None:
                    return True
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    names.append(getattr(e, "id", getattr(e, "attr", "")))
                if {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names):
                    return True
        cur = parents.get(cur)
    return False


def _imports(path: Path, package: str | None):
    """(module name, lineno, guarded) for every import in ``path`` (any depth), relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, _guarded(node, parents)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None:
                    continue
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, node.lineno, _guarded(node, parents)
            for a in node.names:  # `from pkg import submodule`
                yield f"{mod}.{a.name}", node.lineno, _guarded(node, parents)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in ("importorskip", "import_module", "__import__") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.args[0].value, node.lineno, name == "importorskip" or _guarded(node, parents)


def collect() -> Found:
    found = Found()
    stdlib = set(sys.stdlib_module_names)
    local = {p.stem: p for p in (ROOT / "tests").glob("*.py")}
    local.update({p.stem: p for p in (ROOT / "benchmarks").glob("*.py")})  # sys.path-inserted scripts
    todo: list[tuple[Path, str | None]] = [(p, None) for p in gpu_test_files() + device_check_scripts()]
    todo.append((ROOT / "tests" / "conftest.py", None))
    seen: set[Path] = set()
    while todo:
        path, package = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        found.files.append(path)
        rel = path.relative_to(ROOT)
        for mod, line, guarded in _imports(path, package):
            top = mod.split(".")[0]
            if not top or top in stdlib or top == "__future__":
                continue
            if top == "cxrkit":
                if any(mod == o or mod.startswith(o + ".") for o in OFF_PATH):
                    continue
                f = _module_file(mod)
                if f is None:
                    continue  # `from cxrkit.x import name` also yields cxrkit.x.name: not a module
                found.cxrkit_modules.add(mod)
                pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
                todo.append((f, pkg))
                parts = mod.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ too
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    pf = _module_file(parent)
                    if pf is not None:
                        found.cxrkit_modules.add(parent)
                        todo.append((pf, parent))
                continue
            if top in local:
                todo.append((local[top], None))
                continue
            if top == "nvidia":  # a namespace package: nvidia.dali, nvidia.nvimgcodec, ...
                if mod.count(".") < 1:
                    continue
                top = ".".join(mod.split(".")[:2])
            found.third_party.setdefault(top, []).append(Use(f"{rel}:{line}", guarded))
    return found


# ---- the venv --------------------------------------------------------------------------------------

def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def _compatible(whl: Path, py: str) -> bool:
    tag = whl.name[:-4].split("-")
    pytag, abi = tag[-3], tag[-2]
    return "py3" in pytag or pytag == f"cp{py}" or (abi == "abi3")


def carried_wheels(workdir: Path) -> list[Path]:
    """The wheels device_check.sh installs: the DALI tar parts reassembled, and .device/extras."""
    wheels: list[Path] = []
    parts = sorted(glob.glob(str(DEVICE / "dali_part_*" / "dali_part_*")))
    if parts:
        tar = workdir / "dali_wheels.tar"
        with tar.open("wb") as out:
            for p in parts:
                out.write(Path(p).read_bytes())
        with tarfile.open(tar) as t:
            t.extractall(workdir)
        wheels += sorted((workdir / "whl").glob("*.whl"))
    wheels += sorted((DEVICE / "extras").glob("*.whl"))
    return wheels


def build_venv(venv: Path, wheels: list[Path], log) -> Path:
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    r = _run(pip + ["torch==2.13.0"] + STAND_INS)  # torch: the local CPU wheel (see env notes)
    if r.returncode:
        raise SystemExit(f"check_device_wheels: could not install the stand-ins: {r.stderr[-2000:]}")
    r = _run(pip + ["cupy-cuda13x"])
    log(f"stand-ins: torch==2.13.0 (CPU) {' '.join(STAND_INS)}; cupy-cuda13x "
        f"{'installed' if r.returncode == 0 else 'did not install (counted as present: it is on the GPU machine)'}")
    pyver = f"{sys.version_info.major}{sys.version_info.minor}"
    direct = [w for w in wheels if _compatible(w, pyver)]
    other = [w for w in wheels if w not in direct]
    if direct:
        r = _run(pip + ["--no-index", "--no-deps"] + [str(w) for w in direct])
        if r.returncode:
            raise SystemExit(f"check_device_wheels: installing the carried wheels failed:\n{r.stderr[-3000:]}")
    for w in other:  # a cp312 wheel: the same project and version for this Python
        name, version = w.name.split("-")[:2]
        r = _run(pip + ["--no-deps", "--only-binary=:all:", f"{name}=={version}"])
        if r.returncode:
            raise SystemExit(f"check_device_wheels: {w.name} is for another Python and {name}=={version} "
                             f"could not be installed here:\n{r.stderr[-1500:]}")
    log(f"carried: {len(wheels)} wheels ({len(direct)} as carried, {len(other)} as the same version for "
        f"Python {sys.version_info.major}.{sys.version_info.minor})")
    return py


_PROBE = r"""
import importlib, json, sys, traceback
out = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        out[name] = None
    except BaseException as e:  # noqa: BLE001
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the collected imports and exit")
    ap.add_argument("--keep", action="store_true", help="keep the venv (printed) for a look")
    a = ap.parse_args(argv)
    found = collect()
    print(f"read {len(found.files)} files: {len(gpu_test_files())} GPU test files, "
          f"{len(device_check_scripts())} benchmark scripts, {len(found.cxrkit_modules)} cxrkit modules")
    for name, uses in sorted(found.third_party.items()):
        g = "guarded" if all(u.guarded for u in uses) else "REQUIRED"
        print(f"  {name:22} {g:9} {uses[0].where}" + (f" (+{len(uses) - 1})" if len(uses) > 1 else ""))
    if a.list:
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="cxrkit-devcheck-"))
    try:
        wheels = carried_wheels(workdir)
        if not wheels:
            print("check_device_wheels: no carried wheels under .device/ (run the README's download recipe first)")
            return 1
        py = build_venv(workdir / "venv", wheels, print)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONNOUSERSITE="1")
        env.pop("PYTHONHOME", None)
        names = sorted(found.third_party) + sorted(found.cxrkit_modules)
        r = _run([str(py), "-c", _PROBE, *names], env=env, cwd=str(workdir))
        if r.returncode:
            print(r.stderr[-3000:])
            return 1
        import json

        res = json.loads(r.stdout.strip().splitlines()[-1])
        missing = []
        for name in sorted(found.third_party):
            if res.get(name) is None:
                continue
            uses = found.third_party[name]
            if name in GPU_MACHINE_HAS:
                print(f"  ok (on the GPU machine, not importable here): {name}")
                continue
            if name in NOT_ON_GPU_MACHINE:
                print(f"  absent by design: {name}: {NOT_ON_GPU_MACHINE[name]}")
                continue
            missing.append(f"{name}: {res[name]}; imported at " + ", ".join(
                f"{u.where}{' (guarded)' if u.guarded else ''}" for u in uses[:4]))
        for name in sorted(found.cxrkit_modules):
            err = res.get(name)
            if err is not None and not any(err.startswith(f"ModuleNotFoundError: No module named '{m}")
                                           for m in GPU_MACHINE_HAS | set(NOT_ON_GPU_MACHINE)):
                missing.append(f"{name} does not import: {err}")
        tests = [str(p.relative_to(ROOT)) for p in gpu_test_files()]
        r = _run([str(py), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
                 env=env, cwd=str(ROOT))
        if r.returncode not in (0, 5):
            missing.append("pytest --collect-only over the GPU test files failed:\n" + r.stdout[-3000:])
        else:
            print(f"  pytest collects the GPU test files: {r.stdout.strip().splitlines()[-1]}")
        if missing:
            print("\nMISSING on the GPU machine with the carried wheels:")
            for m in missing:
                print("  - " + m)
            return 1
        print(f"\nok: every module the GPU check imports is on the GPU machine or carried "
              f"({len(found.third_party)} third-party, {len(found.cxrkit_modules)} cxrkit)")
        return 0
    finally:
        if a.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
