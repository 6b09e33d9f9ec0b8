"""Codes for the DICOM outputs: SNOMED CT where the ontology has a concept, cxrkit's own otherwise.

A finding whose ``labels.FindingDef`` carries a SNOMED CT concept id is coded ``(id, "SCT",
display name)``. Every other finding, in the ontology or not (a model package may bring labels of
its own, issue 15), is coded in cxrkit's private coding scheme ``99CXRKIT`` (the "99" prefix is
the standard's mark of a private scheme, PS3.16 8.2), which every SR declares in its Coding Scheme
Identification Sequence. A private code value is the label key itself when it fits a Short String
(16 characters of the allowed set), else a stable digest of it, so the same label always gets the
same code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cxrkit.labels import FINDINGS

__all__ = ["PRIVATE_SCHEME", "FindingCode", "finding_code", "private_code", "coding_scheme_item",
           "PRESENT", "ABSENT", "INDETERMINATE"]

PRIVATE_SCHEME = "99CXRKIT"
PRIVATE_SCHEME_NAME = "cxrkit findings and measurements"
PRIVATE_SCHEME_ORGANIZATION = "cxrkit project (demonstration software, not a medical device)"

# (value, scheme, meaning) triples; pydicom's code dictionary has the same values
PRESENT = ("52101004", "SCT", "Present")
ABSENT = ("272519000", "SCT", "Absent")
INDETERMINATE = ("82334004", "SCT", "Indeterminate")
PROBABILITY = ("122157", "DCM", "Probability")
NO_UNITS = ("1", "UCUM", "no units")
PLAIN_RADIOGRAPHY = ("168537006", "SCT", "Plain radiography")
CHEST = ("816094009", "SCT", "Chest")
_SH_ALLOWED = re.compile(r"^[A-Za-z0-9_.\- ]{1,16}$")


@dataclass(frozen=True)
class FindingCode:
    """A finding's code: ``value``, ``scheme`` ("SCT" or "99CXRKIT"), ``meaning`` (display name)."""

    key: str
    value: str
    scheme: str
    meaning: str

    @property
    def is_private(self) -> bool:
        return self.scheme == PRIVATE_SCHEME

    def coded(self) -> Any:
        import highdicom as hd

        return hd.sr.CodedConcept(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


def private_code(key: str) -> str:
    """The private code value of a label: the key when it is a valid Short String, else 'L' + a digest."""
    if _SH_ALLOWED.match(key) and key.strip() == key:
        return key
    return "L" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:15]


def _meaning(text: str) -> str:
    text = " ".join(str(text).split()).replace("\\", "/")  # LO: no backslash, no control characters
    return text[:64] or "unnamed finding"


def finding_code(key: str) -> FindingCode:
    """The code of the finding ``key`` (an ontology key, or a label a model package brought)."""
    d = FINDINGS.get(key)
    if d is not None and d.snomed_ct:
        return FindingCode(key, d.snomed_ct, "SCT", _meaning(d.display_name))
    name = d.display_name if d is not None else key.replace("_", " ").strip().capitalize()
    return FindingCode(key, private_code(key), PRIVATE_SCHEME, _meaning(name))


def display_name(key: str) -> str:
    d = FINDINGS.get(key)
    return d.display_name if d is not None else _meaning(key.replace("_", " ").strip().capitalize())


def coded(triple: tuple[str, str, str]) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=triple[0], scheme_designator=triple[1], meaning=triple[2])


def private(value: str, meaning: str) -> Any:
    return coded((value, PRIVATE_SCHEME, meaning))


def coding_scheme_item() -> Any:
    """The Coding Scheme Identification Sequence item declaring ``99CXRKIT``."""
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME, responsible_organization=PRIVATE_SCHEME_ORGANIZATION
    )
