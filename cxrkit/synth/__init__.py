"""Synthetic findings on real and procedural chest radiographs, for training and evaluating demo models.

    bgs = load_lungbox("/path/to/lungbox")
    img, lesions = synthesize(bgs[0], ["nodule", "pleural_effusion"], seed=7)
    lesions[0].label, lesions[0].box_xyxy   # ground truth in img pixels

Numpy only (PIL to read images); no torch needed.
"""

from __future__ import annotations

from .backgrounds import LUNG_HEIGHT_MM, Background, load_lungbox, procedural_chest, split_by_patient
from .lesions import RENDERERS, SYNTH_LABELS, Lesion, insert_lesion, synthesize

__all__ = ["Background", "LUNG_HEIGHT_MM", "load_lungbox", "procedural_chest", "split_by_patient",
           "Lesion", "RENDERERS", "SYNTH_LABELS", "insert_lesion", "synthesize"]
