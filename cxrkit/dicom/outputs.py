"""``make_outputs``: a Prediction and its source image in, DICOM datasets out.

Every output is in the source's Study (a new Study for a non-DICOM source, see ``source.py``),
in a Series of its own (SR, PR and OT cannot share one), with new UIDs, the time it was made as
its Series/Content date and time, and references to the source SOP Instance. Values copied from
the source that are invalid for their Value Representation (a Patient's Age "62", an over-long
Short String...) are left empty in the outputs, with a warning, so that every object is valid.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from cxrkit.config import Limits
from cxrkit.errors import InputError
from cxrkit.io.image import LoadedImage
from cxrkit.results import Prediction

__all__ = ["DicomOutputs", "make_outputs", "OUTPUT_KINDS", "SERIES_NUMBERS"]

log = logging.getLogger(__name__)

OUTPUT_KINDS = ("sr", "gsps", "sc")
#: Series Number of each output kind (the source's series keep theirs)
SERIES_NUMBERS = {"sc": 9001, "gsps": 9002, "sr": 9003}
_UNPAIRED_BODY_PARTS = frozenset({"CHEST", "ABDOMEN", "CHESTABDOMEN", "CSPINE", "TSPINE", "LSPINE", "SPINE", "HEAD",
                                  "NECK", "PELVIS", "WHOLEBODY"})
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                         "UR", "UT"})


@dataclass
class DicomOutputs:
    """What ``make_outputs`` made for one Prediction.

    sr / gsps / sc: the Comprehensive SR, the presentation state and the burned-in Secondary
    Capture (None when not asked for). source: for a non-DICOM input, the SC holding the input
    image that the others reference (store it too); None for a DICOM source. warnings: values of
    the source left out of the outputs, and why."""

    sr: Any = None
    gsps: Any = None
    sc: Any = None
    source: Any = None
    warnings: list[str] = field(default_factory=list)

    def datasets(self) -> list[Any]:
        """The datasets in the order to store them: the source SC first (if any), then SC, PR, SR."""
        return [d for d in (self.source, self.sc, self.gsps, self.sr) if d is not None]

    def save(self, folder: "str | os.PathLike[str]") -> list[Path]:
        """Write each dataset as ``<folder>/<Modality>_<SOPInstanceUID>.dcm`` (DICOM Part 10)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in self.datasets():
            p = out / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            tmp = p.with_suffix(".dcm.tmp")
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, p)
            paths.append(p)
        return paths


def make_outputs(pred: Prediction, source: Any, *, kinds: Iterable[str] = OUTPUT_KINDS,
                 image: LoadedImage | None = None, study: Any = None, model: Any = None,
                 uid_prefix: str | None = None, sc_max_side: int = 2048, limits: Limits = Limits()) -> DicomOutputs:
    """DICOM outputs for ``pred``, the Prediction of the input ``source``.

    source: the item that was predicted: a DICOM path / bytes / pydicom Dataset, or a JPEG/PNG
        path / bytes / numpy array (these get a new Study, see ``study``).
    kinds: any of "sr" (TID 1500 Comprehensive SR), "gsps" (Grayscale Softcopy Presentation
        State), "sc" (Secondary Capture with the findings burned in).
    image: the LoadedImage already read from ``source`` (saves decoding it again for the SC).
    study: a ``cxrkit.dicom.StudyInfo`` with the new Study's identifiers for a non-DICOM source.
    model: the model's name (str) or a ModelPackage / Detector, for the algorithm identification
        (default: ``pred.model``).
    uid_prefix: an organization UID root ending in "." for the new UIDs (default: pydicom's).
    sc_max_side: the burned-in SC's longer side is at most this many pixels.

    Raises ``InputError`` for a failed Prediction, a source whose size differs from the
    Prediction's, or a DICOM source without the UIDs that outputs must reference.
    """
    from cxrkit import __version__
    from cxrkit.dicom.source import display_u8, new_uid, resolve_source

    require("highdicom")
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in OUTPUT_KINDS]
    if bad:
        raise ValueError(f"unknown output kind(s) {bad}; expected any of {OUTPUT_KINDS}")
    if pred.error is not None:
        raise InputError(pred.source, f"no DICOM outputs for a failed prediction ({type(pred.error).__name__}: "
                         f"{pred.error})")
    model_name, model_version, card = _model_identity(model, pred)
    src = resolve_source(source, image=image, study=study, limits=limits, uid_prefix=uid_prefix,
                         model_name=model_name, name=pred.source)
    ref = src.header
    size = (int(ref.Rows), int(ref.Columns))
    if pred.image_size is not None and tuple(pred.image_size) != size:
        raise InputError(src.name, f"the Prediction is for a {pred.image_size[0]}x{pred.image_size[1]} image but the "
                         f"source is {size[0]}x{size[1]}: pass the item that was predicted")
    software = f"cxrkit {__version__}"
    now = datetime.datetime.now()
    issues = list(pred.meta.get("header_issues") or [])
    warns = list(pred.warnings)
    out = DicomOutputs(source=src.created, warnings=list(src.warnings))
    if "sc" in kinds:
        from cxrkit.dicom.sc import make_sc, render_burned_in

        rgb = render_burned_in(display_u8(src.pixels()), pred, model_name=model_name, warnings_=warns,
                               max_side=sc_max_side)
        out.sc = make_sc(rgb, ref, series_uid=new_uid(uid_prefix), sop_uid=new_uid(uid_prefix),
                         series_number=SERIES_NUMBERS["sc"], model_name=model_name, software_version=software, now=now)
    if "gsps" in kinds:
        from cxrkit.dicom.gsps import make_gsps

        out.gsps = make_gsps(pred, ref, series_uid=new_uid(uid_prefix), sop_uid=new_uid(uid_prefix),
                             series_number=SERIES_NUMBERS["gsps"], model_name=model_name, software_version=software,
                             warnings_=warns, now=now)
    if "sr" in kinds:
        from cxrkit.dicom.sr import make_sr

        out.sr = make_sr(pred, ref, series_uid=new_uid(uid_prefix), sop_uid=new_uid(uid_prefix),
                         series_number=SERIES_NUMBERS["sr"], model_name=model_name, model_version=model_version,
                         software_version=software, device_uid=_device_uid(model_name), header_issues=issues,
                         not_assessed=_disabled(card), now=now)
    body_part = str(ref.get("BodyPartExamined") or "")
    for ds in (out.sc, out.gsps):
        if ds is None:
            continue
        if body_part:
            ds.BodyPartExamined = body_part
        # General Series Laterality, Type 2C: absent for an unpaired body part (the chest), else the
        # source's value or empty (unknown)
        if body_part.upper() in _UNPAIRED_BODY_PARTS:
            if "Laterality" in ds:
                del ds.Laterality
        elif "Laterality" not in ds:
            ds.Laterality = ref.get("Laterality") or ""
    for ds in (out.sc, out.gsps, out.sr):
        if ds is not None:
            out.warnings.extend(sanitize(ds, src.name))
            _set_charset(ds, pred.findings)
    for w in dict.fromkeys(out.warnings):
        log.warning("%s: %s", src.name, w)
    return out


def require(module: str) -> None:
    """``BackendUnavailableError`` with the pip command when an optional DICOM dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        from cxrkit.errors import BackendUnavailableError

        raise BackendUnavailableError(f"cxrkit.dicom needs {module}, which is not installed: pip install 'cxrkit[dicom]'")


def _model_identity(model: Any, pred: Prediction) -> tuple[str, str, Any]:
    """(name, version, card) of the model: from a Detector / ModelPackage, else from the card of
    the bundled model the Prediction names, else the name alone, version "unknown", no card."""
    card = getattr(getattr(model, "model", model), "card", None)
    if card is None:
        card = _bundled_card(model if isinstance(model, str) and model else pred.model)
    if card is not None:
        return (str(getattr(card, "name", "") or pred.model or "model"), str(getattr(card, "version", "") or "unknown"),
                card)
    return (model if isinstance(model, str) and model else pred.model) or "model", "unknown", None


def _disabled(card: Any) -> frozenset[str]:
    """The labels the model card disables: the model does not assess them (untrained or below its
    validation bar), so the SR reports nothing about them rather than "absent"."""
    try:
        return frozenset(k for k, on in zip(card.labels, card.enabled) if not bool(on))
    except (AttributeError, TypeError):
        return frozenset()


@functools.lru_cache(maxsize=8)
def _bundled_card(name: str) -> Any:
    try:
        from cxrkit.models import list_models, load_model_package

        return load_model_package(name).card if name in list_models() else None
    except Exception:  # noqa: BLE001 - only a version string is at stake
        log.debug("no card for model %r", name, exc_info=True)
        return None


def _device_uid(model_name: str) -> str:
    """A stable UID for the cxrkit device (observer) running ``model_name``: same name, same UID."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["cxrkit device", model_name]))


def sanitize(ds: Any, name: str) -> list[str]:
    """Empty the top-level string values of ``ds`` that are invalid for their VR (a source's Patient's
    Age "62", a Study Date that is a hash...); returns what was changed. An invalid UID raises
    ``InputError``: outputs must reference the source by its UIDs, so it cannot be left out."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    changed: list[str] = []
    for elem in list(ds):
        if elem.VR not in _STRING_VRS or elem.value in (None, ""):
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        try:
            for v in values:
                validate_value(elem.VR, str(v), config.RAISE)
        except (ValueError, TypeError) as exc:
            if elem.VR == "UI":  # our own UIDs are valid; a source UID that is not cannot be repaired
                raise InputError(name, f"the source's {elem.keyword} {elem.value!r} is not a valid UID: {exc}") from exc
            changed.append(f"source {elem.keyword} {str(elem.value)!r} is not a valid {elem.VR} ({exc}); "
                           "left empty in the outputs")
            elem.value = ""
    return changed


def _set_charset(ds: Any, labels: Iterable[str]) -> None:
    """ISO_IR 192 (UTF-8) when any text is not ASCII (values are decoded strings, so re-encoding
    them in UTF-8 is exact whatever set the source declared). Text that is not ASCII can come only
    from the source's top-level attributes (names, descriptions) or from label names a model
    package brought, so only those are looked at."""
    if not all(str(k).isascii() for k in labels) or _has_non_ascii(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"


def _has_non_ascii(ds: Any) -> bool:
    for elem in ds:
        if elem.VR in _STRING_VRS or elem.VR == "PN":
            vals = elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]
            if any(not str(v).isascii() for v in vals if v is not None):
                return True
    return False


def outputs_for(preds: Sequence[Prediction], sources: Sequence[Any], **kw: Any) -> list[DicomOutputs | None]:
    """``make_outputs`` for each (prediction, source) pair; None for failed predictions."""
    return [make_outputs(p, s, **kw) if p.ok else None for p, s in zip(preds, sources)]
