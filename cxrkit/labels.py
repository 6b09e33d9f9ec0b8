"""The 29-finding ontology of cxrkit's default model family.

Modelled on what commercial chest-radiograph readers (qXR-class products) report: focal lung
lesions, pleural and mediastinal abnormalities, diffuse parenchymal patterns, bony and
subdiaphragmatic findings. ``kind`` is "focal" (a localizable lesion with a box) or "diffuse"
(a pattern or global measurement whose box covers the involved region).

Codes are SNOMED CT concept ids, given only where the concept is unambiguous; ``None`` means
no single concept fits (or it was not verified), never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

__all__ = ["FindingDef", "FINDINGS", "FINDING_KEYS", "get_finding", "NIH14_TO_FINDING", "nih14_key",
           "XRV_TO_FINDING", "source_label_key", "display_name"]


@dataclass(frozen=True)
class FindingDef:
    key: str
    display_name: str
    definition: str
    kind: Literal["focal", "diffuse"]
    snomed_ct: str | None = None


_DEFS = (
    FindingDef("nodule", "Nodule", "Rounded opacity up to 3 cm in diameter, well or poorly defined.", "focal", "427359005"),
    FindingDef("mass", "Mass", "Pulmonary, pleural or mediastinal opacity larger than 3 cm.", "focal"),
    FindingDef("consolidation", "Consolidation", "Airspace opacity obscuring vessels, often with air bronchograms.", "focal", "95436008"),
    FindingDef("opacity", "Opacity", "Any area of increased attenuation in the lung not otherwise specified.", "focal"),
    FindingDef("atelectasis", "Atelectasis", "Reduced lung volume with increased opacity and displaced fissures or structures.", "focal", "46621007"),
    FindingDef("pleural_effusion", "Pleural effusion", "Fluid in the pleural space: dependent opacity with a meniscus.", "focal", "60046008"),
    FindingDef("blunted_cp_angle", "Blunted costophrenic angle", "Loss of the sharp costophrenic recess, from fluid or pleural thickening.", "focal"),
    FindingDef("pneumothorax", "Pneumothorax", "Air in the pleural space: a visceral pleural line with no lung markings beyond it.", "focal", "36118008"),
    FindingDef("cardiomegaly", "Cardiomegaly", "Cardiothoracic ratio above 0.5 on a PA radiograph.", "diffuse", "8186001"),
    FindingDef("hilar_enlargement", "Hilar enlargement", "Enlarged or dense hilum from nodes, vessels or a mass.", "focal"),
    FindingDef("mediastinal_widening", "Mediastinal widening", "Superior mediastinum wider than expected for the projection.", "focal"),
    FindingDef("cavity", "Cavity", "Gas-filled space within an opacity, with a wall thicker than 1 mm.", "focal"),
    FindingDef("calcification", "Calcification", "Opacity of calcium density: granulomas, nodes, pleural plaques.", "focal"),
    FindingDef("fibrosis", "Fibrosis", "Reticular opacities with volume loss and architectural distortion.", "diffuse", "51615001"),
    FindingDef("reticulonodular_pattern", "Reticulonodular pattern", "Combined fine linear and nodular interstitial opacities.", "diffuse"),
    FindingDef("emphysema", "Emphysema", "Hyperlucent, hyperexpanded lungs with attenuated vessels or bullae.", "diffuse", "87433001"),
    FindingDef("pleural_thickening", "Pleural thickening", "Smooth or nodular thickening of the pleura along the chest wall.", "focal"),
    FindingDef("pneumoperitoneum", "Pneumoperitoneum", "Free intraperitoneal gas, seen as a lucency under a hemidiaphragm.", "focal"),
    FindingDef("rib_fracture", "Rib fracture", "Cortical break or callus of a rib.", "focal", "33737001"),
    FindingDef("scoliosis", "Scoliosis", "Lateral curvature of the thoracic spine.", "diffuse", "298382003"),
    FindingDef("tracheal_shift", "Tracheal shift", "Deviation of the trachea from the midline.", "focal"),
    FindingDef("elevated_hemidiaphragm", "Elevated hemidiaphragm", "One hemidiaphragm higher than expected relative to the other.", "focal"),
    FindingDef("pulmonary_edema", "Pulmonary edema", "Perihilar haze, septal lines and vascular redistribution from fluid.", "diffuse", "19242006"),
    FindingDef("tuberculosis", "Findings suggestive of TB", "Upper-zone opacities, cavitation, fibrosis or miliary nodules typical of tuberculosis.", "diffuse", "154283005"),
    FindingDef("hyperinflation", "Hyperinflation", "Flattened hemidiaphragms and increased lung volume.", "diffuse"),
    FindingDef("bronchiectasis", "Bronchiectasis", "Dilated, thick-walled bronchi: tram lines and ring shadows.", "focal", "12295008"),
    FindingDef("subcutaneous_emphysema", "Subcutaneous emphysema", "Gas streaks in the soft tissues of the chest wall or neck.", "focal"),
    FindingDef("aortic_enlargement", "Aortic enlargement", "Prominent or unfolded aortic knob and arch.", "focal"),
    FindingDef("hiatal_hernia", "Hiatal hernia", "Retrocardiac gas-containing mass from stomach herniated through the hiatus.", "focal", "84089009"),
)

assert len(_DEFS) == 29 and len({d.key for d in _DEFS}) == 29

FINDINGS: Mapping[str, FindingDef] = MappingProxyType({d.key: d for d in _DEFS})
FINDING_KEYS: tuple[str, ...] = tuple(d.key for d in _DEFS)


def get_finding(key: str) -> FindingDef:
    try:
        return FINDINGS[key]
    except KeyError:
        raise KeyError(f"unknown finding {key!r}; known findings: {', '.join(FINDING_KEYS)}") from None


# NIH ChestX-ray14's 14 finding names (Data_Entry_2017 labels, plus the box file's "Infiltrate")
# mapped onto the ontology. Pneumonia and Consolidation both become consolidation (on a frontal
# film they are one airspace-opacity pattern); Infiltration is the unspecific "opacity".
NIH14_TO_FINDING: Mapping[str, str] = MappingProxyType({
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "pleural_effusion",
    "Infiltration": "opacity",
    "Infiltrate": "opacity",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pneumonia": "consolidation",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Edema": "pulmonary_edema",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Pleural_Thickening": "pleural_thickening",
    "Hernia": "hiatal_hernia",
})


def nih14_key(name: str) -> str | None:
    """The ontology key of an NIH ChestX-ray14 finding name (``"Effusion"`` -> ``"pleural_effusion"``),
    case- and separator-insensitive (``"pleural thickening"``); None for "No Finding" or unknown names."""
    norm = lambda s: re.sub(r"[^a-z]", "", s.lower())  # noqa: E731
    want = norm(name)
    for k, v in NIH14_TO_FINDING.items():
        if norm(k) == want:
            return v
    return None


# torchxrayvision's 18 output names (its default_pathologies; also what CheXNet-style models
# trained on NIH / CheXpert call their outputs) -> ontology keys, one to one, so an imported
# model never has two outputs with one key. None: no finding of the ontology means the same thing;
# the output keeps its own name as a key (source_label_key). Unlike NIH14_TO_FINDING (which
# pools ground truth), Infiltration and Pneumonia stay themselves here: "opacity" and
# "consolidation" belong to Lung Opacity and Consolidation, which torchxrayvision also outputs.
XRV_TO_FINDING: Mapping[str, str | None] = MappingProxyType({
    "Atelectasis": "atelectasis",
    "Consolidation": "consolidation",
    "Infiltration": None,
    "Pneumothorax": "pneumothorax",
    "Edema": "pulmonary_edema",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Effusion": "pleural_effusion",
    "Pneumonia": None,
    "Pleural_Thickening": "pleural_thickening",
    "Cardiomegaly": "cardiomegaly",
    "Nodule": "nodule",
    "Mass": "mass",
    "Hernia": "hiatal_hernia",
    "Lung Lesion": None,
    "Fracture": None,
    "Lung Opacity": "opacity",
    "Enlarged Cardiomediastinum": None,
})


def source_label_key(name: str) -> str:
    """The card key of a source model's output name: its ontology key when XRV_TO_FINDING maps it
    or the name already is one (``"Effusion"`` -> ``"pleural_effusion"``, ``"nodule"`` ->
    ``"nodule"``), else the name itself as a snake_case key (``"Lung Lesion"`` -> ``"lung_lesion"``).
    Raises ValueError for a name with no letters or digits."""
    norm = lambda s: re.sub(r"[^a-z0-9]", "", s.lower())  # noqa: E731
    for k, v in XRV_TO_FINDING.items():
        if v is not None and norm(k) == norm(name):
            return v
    key = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    if not key:
        raise ValueError(f"label {name!r} has no letters or digits to make a key from")
    if key[0].isdigit():
        key = "l_" + key
    return key


def display_name(key: str) -> str:
    """The ontology's display name of ``key``, or for a label outside it (an imported model's own)
    the key in words: ``"lung_lesion"`` -> ``"Lung lesion"``."""
    d = FINDINGS.get(key)
    return d.display_name if d is not None else key.replace("_", " ").strip().capitalize()
