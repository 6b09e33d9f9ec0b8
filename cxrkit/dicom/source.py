"""The image the outputs refer to: a DICOM source's own header, or a new Study for other inputs.

A DICOM source (a path, bytes or a pydicom Dataset) keeps its identity: every output goes into
its Study and references its SOP Instance. A JPEG, PNG or array has no Study: ``make_outputs``
wraps it in a Secondary Capture (the gray image as cxrkit read it, no overlay) in a new Study
whose identifiers the caller may pass as a ``StudyInfo``; the outputs reference that SC, which
is returned with them so that the references resolve once it is stored.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrkit.config import Limits
from cxrkit.errors import InputError
from cxrkit.io.image import LoadedImage

__all__ = ["StudyInfo", "Source", "resolve_source", "display_u8", "new_uid"]

# attributes of the Patient and General Study modules that are Type 2 (present, maybe empty)
_TYPE2_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
_SEX = ("", "M", "F", "O")


def new_uid(prefix: str | None = None) -> str:
    """A new UID: under ``prefix`` (an organization root ending in '.') or pydicom's default root."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=prefix) if prefix else generate_uid())


@dataclass(frozen=True)
class StudyInfo:
    """Identifiers of the new Study made for a non-DICOM input (JPEG, PNG, numpy array).

    Empty strings are written as empty (DICOM Type 2) values; ``study_instance_uid`` None makes a
    new UID; ``study_date``/``study_time`` None take the time the outputs are made. Pass the same
    StudyInfo (with a fixed ``study_instance_uid``) for several images of one examination.
    Ignored for DICOM inputs, whose own Study is used.
    """

    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_instance_uid: str | None = None
    study_date: "str | datetime.date | None" = None
    study_time: "str | datetime.time | None" = None
    study_description: str = ""
    referring_physician_name: str = ""
    institution_name: str = ""

    def __post_init__(self) -> None:
        def check(name: str, value: str, max_len: int, pattern: str | None = None) -> None:
            if len(value) > max_len or "\\" in value or any(ord(c) < 32 for c in value):
                raise ValueError(f"StudyInfo.{name} = {value!r}: expected at most {max_len} characters, "
                                 "no backslash or control characters")
            if pattern and value and not re.fullmatch(pattern, value):
                raise ValueError(f"StudyInfo.{name} = {value!r} does not have the expected form {pattern}")

        check("patient_id", self.patient_id, 64)
        check("patient_name", self.patient_name, 64 * 5)
        check("patient_birth_date", self.patient_birth_date, 8, r"\d{8}")
        check("accession_number", self.accession_number, 16)
        check("study_id", self.study_id, 16)
        check("study_description", self.study_description, 64)
        check("referring_physician_name", self.referring_physician_name, 64 * 5)
        check("institution_name", self.institution_name, 64)
        if self.patient_sex not in _SEX:
            raise ValueError(f"StudyInfo.patient_sex = {self.patient_sex!r}: expected one of {_SEX}")
        if self.study_instance_uid is not None:
            check("study_instance_uid", self.study_instance_uid, 64, r"[0-9]+(\.[0-9]+)*")


@dataclass
class Source:
    """header: the source's attributes without pixel data (what outputs copy and reference);
    image: its pixels as cxrkit reads them (for the Secondary Capture; None until needed);
    created: the SC made for a non-DICOM input (None for a DICOM source); name: for messages;
    warnings: what was changed on the way (invalid source values left out)."""

    header: Any
    image: LoadedImage | None
    created: Any
    name: str
    warnings: list[str] = field(default_factory=list)
    load: Any = None  # () -> LoadedImage, when image is None

    def pixels(self) -> LoadedImage:
        if self.image is None:
            self.image = self.load()
        return self.image


def _is_dataset(item: Any) -> bool:
    try:
        from pydicom import Dataset
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        return False
    return isinstance(item, Dataset)


def display_u8(img: LoadedImage) -> np.ndarray:
    """(h, w) uint8, bone bright: the image through its value range (the window io chose)."""
    from cxrkit.io import decode_pixels

    if img.pixels is None:
        img = decode_pixels(img)
    lo, hi = (float(v) for v in img.value_range)
    px = img.pixels
    if px.dtype == np.uint8 and (lo, hi) == (0.0, 255.0):
        return px
    scale = 255.0 / max(hi - lo, 1e-12)
    out = (px.astype(np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _load_image(item: Any, name: str, limits: Limits) -> LoadedImage:
    from cxrkit.io import decode_pixels, load_item

    img = load_item(item, 0, limits=limits)
    return decode_pixels(img) if img.pixels is None else img


def header_of(ds: Any) -> Any:
    """A copy of ``ds`` without pixel data, float/double pixel data or overlay data."""
    from pydicom.dataset import Dataset, FileMetaDataset

    out = Dataset()
    for elem in ds:
        if elem.tag in (0x7FE00010, 0x7FE00008, 0x7FE00009) or (elem.tag.group & 0xFF00) == 0x6000:
            continue
        out.add(elem)
    out.file_meta = FileMetaDataset()
    for elem in getattr(ds, "file_meta", None) or []:
        out.file_meta.add(elem)
    return out


def resolve_source(item: Any, *, image: LoadedImage | None = None, study: StudyInfo | None = None,
                   limits: Limits = Limits(), uid_prefix: str | None = None, model_name: str = "",
                   name: str | None = None) -> Source:
    """The source of a Prediction as outputs need it (see the module docstring).

    ``item``: the input that was predicted (path, bytes, pydicom Dataset, numpy array).
    ``image``: the LoadedImage already read from it, to save a second decode for the SC.
    """
    from cxrkit.io.sources import describe_item

    name = name or describe_item(item, 0)
    ds = _as_dataset(item, name, limits)
    if ds is not None:
        return _dicom_source(ds, image, name, limits)
    img = image if image is not None and image.pixels is not None else _load_image(item, name, limits)
    created = make_source_sc(img, study or StudyInfo(), uid_prefix=uid_prefix, model_name=model_name, name=name)
    return Source(header=header_of(created), image=img, created=created, name=name)


def _as_dataset(item: Any, name: str, limits: Limits) -> Any:
    """A pydicom Dataset for a DICOM item, None for anything else."""
    if _is_dataset(item):
        return item
    if isinstance(item, (str, os.PathLike)):
        from cxrkit.io.sniff import SNIFF_BYTES, sniff

        try:
            with open(item, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError as exc:
            raise InputError(name, f"cannot read the source file: {exc.strerror or exc}") from exc
        if sniff(head, source=name) != "dicom":
            return None
        with open(item, "rb") as f:
            data = f.read(limits.max_file_bytes + 1)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        from cxrkit.io.sniff import sniff

        data = bytes(item)
        if sniff(data[:4096], source=name) != "dicom":
            return None
    else:
        return None
    from cxrkit.io.dicom import read_dataset

    return read_dataset(data, name, limits)


def _dicom_source(ds: Any, image: LoadedImage | None, name: str, limits: Limits) -> Source:
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not ds.get(k)]
    if missing:
        raise InputError(name, f"the DICOM source has no {', '.join(missing)}: outputs cannot be placed in its "
                         "Study or reference it; give it these UIDs (or pass the pixels as an array to get a new Study)")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise InputError(name, f"the DICOM source has SamplesPerPixel {ds.get('SamplesPerPixel')}: presentation "
                         "states and SR image regions here are made for grayscale radiographs")
    header = header_of(ds)
    from cxrkit.dicom.outputs import sanitize

    warnings_: list[str] = sanitize(header, name)  # before highdicom parses dates, names, ages
    for kw in _TYPE2_STUDY:
        if kw not in header:
            setattr(header, kw, "")
    if header.get("PatientSex") not in _SEX:
        warnings_.append(f"source PatientSex {header.PatientSex!r} is not one of M/F/O; left empty in the outputs")
        header.PatientSex = ""

    def load() -> LoadedImage:
        return _load_image(ds, name, limits)

    img = image if image is not None and image.pixels is not None else None
    return Source(header=header, image=img, created=None, name=name, warnings=warnings_, load=load)


def make_source_sc(img: LoadedImage, study: StudyInfo, *, uid_prefix: str | None, model_name: str,
                   name: str) -> Any:
    """A Secondary Capture of a non-DICOM input (gray, as cxrkit read it) opening a new Study."""
    import highdicom as hd

    from cxrkit import __version__

    now = datetime.datetime.now()
    px = img.pixels
    lo, hi = (float(v) for v in img.value_range)
    if px.dtype == np.uint8:
        stored, bits = px, 8
    elif px.dtype == np.uint16 and lo >= 0 and hi <= 65535:
        stored, bits = px, 16
    else:  # float32 (or a uint16 window reaching outside 0..65535): map the value range onto 16 bits
        scale = 65535.0 / max(hi - lo, 1e-12)
        stored = np.clip((px.astype(np.float64) - lo) * scale + 0.5, 0, 65535).astype(np.uint16)
        bits, lo, hi = 16, 0.0, 65535.0
    sc = hd.sc.SCImage(
        pixel_array=np.ascontiguousarray(stored),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=bits,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # placeholder for highdicom; replaced below (unknown)
        study_instance_uid=study.study_instance_uid or new_uid(uid_prefix),
        series_instance_uid=new_uid(uid_prefix),
        series_number=1,
        sop_instance_uid=new_uid(uid_prefix),
        instance_number=1,
        manufacturer="cxrkit",
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        patient_birth_date=study.patient_birth_date,
        patient_sex=study.patient_sex or None,
        accession_number=study.accession_number,
        study_id=study.study_id,
        study_date=study.study_date or now.date(),
        study_time=study.study_time or now.time(),
        referring_physician_name=study.referring_physician_name,
        manufacturer_model_name=model_name or "cxrkit",
        software_versions=f"cxrkit {__version__}",
        series_description="cxrkit input image",
        content_date=now.date(),
        content_time=now.time(),
    )
    sc.PatientOrientation = ""  # not known for a file that carried no header
    if not study.patient_sex:
        sc.PatientSex = ""
    if study.study_description:
        sc.StudyDescription = study.study_description
    if study.institution_name:
        sc.InstitutionName = study.institution_name
    sc.ConversionType = "WSD"
    sc.BodyPartExamined = "CHEST"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = _lo(f"{img.format.upper()} input {os.path.basename(name)} converted to DICOM by cxrkit")
    if bits == 16 or (lo, hi) != (0.0, 255.0):
        sc.WindowCenter = f"{(lo + hi) / 2:.1f}"
        sc.WindowWidth = f"{max(hi - lo, 1.0):.1f}"
    return sc


def _lo(text: str) -> str:
    return " ".join(text.replace("\\", "/").split())[:64]
