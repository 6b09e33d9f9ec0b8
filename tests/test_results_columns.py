"""The columnar host path gives exactly the results of the code before it (issue 13).

Each case of tests/host_path_cases.py was recorded by the Detector of commit 58145cf (a git
worktree, `python tests/host_path_cases.py --write --old-tree ...`): real radiographs of samples/
and ../shared/data in every input form (paths, bytes, uint8/uint16/float32/RGB(A) arrays, DICOM),
bad items mixed into the batches, boxes="positive" and "all", return_heatmaps, predict /
predict_iter without prefetch / one item per call, the `cxrkit predict` JSON lines and the Ray
actor's rows; on a snapshot of the cxr29-demo package and on the probe model. Here the same cases
run through today's code and every field must be equal: scores bit for bit (float.hex), boxes,
box scores and points as raw float32 bytes, the heatmaps' sha256, to_dict() content.
"""

from __future__ import annotations

import functools

import pytest

import cxrkit
import host_path_cases as hp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@functools.lru_cache(maxsize=None)
def _same_network(which: str) -> bool:
    """Whether this machine's preprocessing + ONNX Runtime give the recording machine's bits."""
    import json

    want = json.loads((hp.FIXTURE / "network-outputs.json").read_text())[which]
    model, inputs = {"snapshot-samples": (str(hp.SNAPSHOT), hp.sample_inputs),
                     "snapshot-shared": (str(hp.SNAPSHOT), hp.shared_inputs),
                     "probe": ("cxr-probe", hp.probe_inputs)}[which]
    return hp.network_fingerprint(cxrkit, model, inputs()) == want


def _network_of(case: str) -> str:
    if case.startswith("probe"):
        return "probe"
    return "snapshot-shared" if case.startswith("shared") else "snapshot-samples"


def _diff(got, want, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}: keys {sorted(got)} != {sorted(want)}"] if list(got) != list(want) else []
        for k in want:
            if k in got:
                out += _diff(got[k], want[k], f"{path}/{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _diff(g, w, f"{path}[{i}]")]
    if type(got) is not type(want) or got != want:
        return [f"{path}: {got!r} != {want!r}"]
    return []


@pytest.mark.parametrize("case", list(hp.cases()))
def test_same_results_as_before(case, request):
    if case.startswith("shared"):
        request.getfixturevalue("shared_data")
    if case == "ray-actor":
        pytest.importorskip("pyarrow")
    if not _same_network(_network_of(case)):
        pytest.skip("this machine's network outputs differ in the last bits from the recording machine's "
                    "(another CPU kernel path in ONNX Runtime or the resize); the comparison needs equal inputs")
    got = hp.cases()[case](cxrkit)
    want = hp.load_expected(case)
    assert len(got) == len(want)
    diffs = [d for i, (g, w) in enumerate(zip(got, want)) for d in _diff(g, w, f"[{i}]")]
    assert not diffs, "\n".join(diffs[:20])
