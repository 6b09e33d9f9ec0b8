"""DICOM in, DICOM out: structured reports, presentation states, secondary captures, a DICOM node.

    from cxrkit.dicom import make_outputs, StudyInfo
    outs = make_outputs(pred, "scan.dcm")              # DicomOutputs: .sr, .gsps, .sc (pydicom Datasets)
    outs.save("out/")                                  # <Modality>_<SOPInstanceUID>.dcm
    outs = make_outputs(pred, "scan.png", study=StudyInfo(patient_id="123", accession_number="A42"))

    from cxrkit.dicom import DicomNode                 # C-STORE SCP -> BatchingDetector -> C-STORE SCU
    with DicomNode("cxr29-demo", ae_title="CXRKIT", port=11112, forward=["pacs:104:PACS"]) as node:
        node.serve_forever()

highdicom and pynetdicom (``pip install cxrkit[dicom]``) are imported when first used.
The outputs are those of a demonstration model: every object says NOT FOR DIAGNOSTIC USE.
"""

from __future__ import annotations

from typing import Any

__all__ = ["make_outputs", "DicomOutputs", "StudyInfo", "DicomNode", "ShutdownReport", "OUTPUT_KINDS", "Destination"]

_LAZY = {
    "make_outputs": "cxrkit.dicom.outputs",
    "DicomOutputs": "cxrkit.dicom.outputs",
    "OUTPUT_KINDS": "cxrkit.dicom.outputs",
    "StudyInfo": "cxrkit.dicom.source",
    "DicomNode": "cxrkit.dicom.node",
    "ShutdownReport": "cxrkit.dicom.node",
    "Destination": "cxrkit.dicom.node",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cxrkit.dicom' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
