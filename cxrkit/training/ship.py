"""The int8 forms a bundled package ships: calibrated on train images, guarded on hundreds of
labelled held-out images (the val patients' real radiographs + the held-out-renderer nodule set),
written into the package with a sha256 for every file the card names (graphs and guard reports)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["ship_int8", "guard_set"]


def guard_set(recs: Sequence[Any], split: dict[str, Any], root: Path, labels: Sequence[str],
              synth_dir: "Path | None" = None) -> tuple[list[str], np.ndarray]:
    """Held-out paths and (N, K) 0/1 labels: val radiographs (NIH labels mapped to ``labels``) and,
    when given, the synthetic nodule set (its background's labels + its nodule)."""
    from ..labels import NIH14_TO_FINDING

    index = {k: i for i, k in enumerate(labels)}
    by_image = {r.image: r for r in recs}
    paths, rows = [], []
    for name in split["val"]["images"]:
        row = np.zeros(len(labels), np.uint8)
        for n in by_image[name].names:
            if NIH14_TO_FINDING[n] in index:
                row[index[NIH14_TO_FINDING[n]]] = 1
        paths.append(str(root / "images" / name))
        rows.append(row)
    if synth_dir is not None and (Path(synth_dir) / "annotations.json").is_file():
        coco = json.loads((Path(synth_dir) / "annotations.json").read_text())
        lesion = {a["image_id"] for a in coco["annotations"]}
        for im in coco["images"]:
            row = np.zeros(len(labels), np.uint8)
            for n in by_image[im["background"]].names:
                if NIH14_TO_FINDING[n] in index:
                    row[index[NIH14_TO_FINDING[n]]] = 1
            if im["id"] in lesion and "nodule" in index:
                row[index["nodule"]] = 1
            paths.append(str(Path(synth_dir) / "images" / im["file_name"]))
            rows.append(row)
    return paths, np.stack(rows)


def ship_int8(out: "str | Path", calib: Sequence[str], holdout: Sequence[str], labels: np.ndarray, *,
              auto_keep_fp32: int = 8, method: str = "minmax", threads: int | None = None) -> dict[str, Any]:
    """``cxrkit.quant.quantize`` into package ``out`` (fp16 + both int8 forms, guarded on ``holdout``
    with per-finding AUROC), then a sha256 in the card for every file it names. Returns a summary.

    ``method`` minmax: on cxr29-demo (2026-11-30, 472 held-out images) percentile calibration
    passed the AUROC guard too but moved single scores by up to 0.31-0.34 (cardiomegaly, 93-95 %
    of its decisions unchanged); minmax moved them by at most 0.08-0.11 (96-98 % unchanged)."""
    from ..errors import AccuracyGuardError
    from ..models import sha256_file
    from ..quant import quantize

    out = Path(out)
    enabled = {k for k, v in json.loads((out / "card.json").read_text()).get("enabled", {}).items() if v}
    summary: dict[str, Any] = {"n_calibration": len(calib), "n_holdout": len(holdout), "method": method}
    try:
        res = quantize(str(out), list(calib), holdout=list(holdout), labels=labels, auto_keep_fp32=auto_keep_fp32,
                       method=method, num_threads=threads)
        reports = res.reports
    except AccuracyGuardError as e:  # one form refused: the other is written; say so in the card
        log.warning("int8 guard: %s", e)
        reports = getattr(getattr(e, "result", None), "reports", {})
        summary["refused"] = str(e)
    for prec, rep in reports.items():
        summary[prec] = {"passed": rep.passed, "n_images": rep.n_images, "failed_findings": rep.failed_findings,
                         "max_abs_score_diff": round(rep.max_abs_score_diff, 5),
                         "mean_abs_score_diff": round(rep.mean_abs_score_diff, 5),
                         "min_decision_agreement_enabled": min(
                             (round(v["decision_agreement"], 4) for k, v in rep.per_finding.items()
                              if k in enabled), default=None)}
    card_path = out / "card.json"
    card = json.loads(card_path.read_text())
    named = set(card["files"].values()) | {q["report"] for q in card.get("quantization", {}).values() if "report" in q}
    card["sha256"] = {n: sha256_file(out / n) for n in sorted(named)}
    for n in named:  # quantize writes owner-only temp files; a packaged model is world-readable
        (out / n).chmod(0o644)
    card.setdefault("quantization", {})["guard_set"] = {
        "calibration": f"{len(calib)} train-patient NIH radiographs",
        "holdout": f"{len(holdout)} labelled held-out images (val-patient NIH radiographs + held-out-renderer "
                   "synthetic nodule images), per-finding AUROC; a finding fails on a drop > 0.005 (enabled ones count)",
        "summary": summary,
    }
    from ..tune import write_card

    write_card(card, card_path)
    return summary
