"""torchxrayvision's published weights: names, labels, operating points, input resolution.

Facts from torchxrayvision 1.5.7 (``torchxrayvision.models.model_urls``, Apache-2.0), kept here
so that ``cxrkit import-model xrv:NAME --weights FILE`` needs neither torchxrayvision nor a
download (tests check this copy against a snapshot taken from the library).

Their input convention: a gray image scaled to [-1024, 1024] (``xrv.datasets.normalize(img,
maxval)``: ``(2 * img / maxval - 1) * 1024``), centre-cropped to a square
(``XRayCenterCrop``) and resized (``XRayResizer``, skimage) to the model's resolution, one
channel. In cxrkit that is ``normalization {"mean": 0.5, "std": 1/2048}`` on the unit range and
``input.fit = "center_crop"``.

Outputs named "" are untrained (padding to the 18 default pathologies): the converter drops them.
``op_threshs`` are the operating points (probabilities) that torchxrayvision's ``op_norm`` maps to
0.5: they become the card's thresholds, so cxrkit's decisions equal ``op_norm(...) >= 0.5``. An
output without one (NaN) is kept but disabled.
"""

from __future__ import annotations

from typing import Any

__all__ = ["XRV_WEIGHTS", "XRV_MEAN", "XRV_STD", "xrv_weights_info"]

XRV_MEAN = 0.5
XRV_STD = 1.0 / 2048.0  # (u - 0.5) * 2048 == (2u - 1) * 1024

XRV_WEIGHTS = {
    'densenet121-res224-all': dict(
        arch='densenet121', input_resolution=224, file='nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt',
        labels=['Atelectasis', 'Consolidation', 'Infiltration', 'Pneumothorax', 'Edema', 'Emphysema', 'Fibrosis', 'Effusion', 'Pneumonia', 'Pleural_Thickening', 'Cardiomegaly', 'Nodule', 'Mass', 'Hernia', 'Lung Lesion', 'Fracture', 'Lung Opacity', 'Enlarged Cardiomediastinum'],
        op_threshs=[0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724, 0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766, 0.053369623, 0.035975814, 0.20204692, 0.05015312]),
    'densenet121-res224-nih': dict(
        arch='densenet121', input_resolution=224, file='nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt',
        labels=['Atelectasis', 'Consolidation', 'Infiltration', 'Pneumothorax', 'Edema', 'Emphysema', 'Fibrosis', 'Effusion', 'Pneumonia', 'Pleural_Thickening', 'Cardiomegaly', 'Nodule', 'Mass', 'Hernia', '', '', '', ''],
        op_threshs=[0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827, 0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434, None, None, None, None]),
    'densenet121-res224-pc': dict(
        arch='densenet121', input_resolution=224, file='pc-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt',
        labels=['Atelectasis', 'Consolidation', 'Infiltration', 'Pneumothorax', 'Edema', 'Emphysema', 'Fibrosis', 'Effusion', 'Pneumonia', 'Pleural_Thickening', 'Cardiomegaly', 'Nodule', 'Mass', 'Hernia', '', 'Fracture', '', ''],
        op_threshs=[0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071, 0.055412333, 0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895, None, 0.026507627, None, None]),
    'densenet121-res224-chex': dict(
        arch='densenet121', input_resolution=224, file='chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt',
        labels=['Atelectasis', 'Consolidation', '', 'Pneumothorax', 'Edema', '', '', 'Effusion', 'Pneumonia', '', 'Cardiomegaly', '', '', '', 'Lung Lesion', 'Fracture', 'Lung Opacity', 'Enlarged Cardiomediastinum'],
        op_threshs=[0.1988969, 0.05710573, None, 0.0531293, 0.1435217, None, None, 0.27212676, 0.07749717, None, 0.19712369, None, None, None, 0.09932402, 0.09273402, 0.3270967, 0.10888247]),
    'densenet121-res224-rsna': dict(
        arch='densenet121', input_resolution=224, file='kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt',
        labels=['', '', '', '', '', '', '', '', 'Pneumonia', '', '', '', '', '', '', '', 'Lung Opacity', ''],
        op_threshs=[None, None, None, None, None, None, None, None, 0.13486601, None, None, None, None, None, None, None, 0.13511065, None]),
    'densenet121-res224-mimic_nb': dict(
        arch='densenet121', input_resolution=224, file='mimic_nb-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt',
        labels=['Atelectasis', 'Consolidation', '', 'Pneumothorax', 'Edema', '', '', 'Effusion', 'Pneumonia', '', 'Cardiomegaly', '', '', '', 'Lung Lesion', 'Fracture', 'Lung Opacity', 'Enlarged Cardiomediastinum'],
        op_threshs=[0.08558747, 0.011884617, None, 0.0040595434, 0.010733786, None, None, 0.118761964, 0.022924708, None, 0.06358637, None, None, None, 0.022143636, 0.017476924, 0.1258702, 0.014020768]),
    'densenet121-res224-mimic_ch': dict(
        arch='densenet121', input_resolution=224, file='mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt',
        labels=['Atelectasis', 'Consolidation', '', 'Pneumothorax', 'Edema', '', '', 'Effusion', 'Pneumonia', '', 'Cardiomegaly', '', '', '', 'Lung Lesion', 'Fracture', 'Lung Opacity', 'Enlarged Cardiomediastinum'],
        op_threshs=[0.09121389, 0.010573786, None, 0.005023008, 0.003698257, None, None, 0.08001232, 0.037242252, None, 0.05006329, None, None, None, 0.019866971, 0.03823637, 0.11303808, 0.0069147074]),
    'resnet50-res512-all': dict(
        arch='resnet50', input_resolution=512, file='pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt',
        labels=['Atelectasis', 'Consolidation', 'Infiltration', 'Pneumothorax', 'Edema', 'Emphysema', 'Fibrosis', 'Effusion', 'Pneumonia', 'Pleural_Thickening', 'Cardiomegaly', 'Nodule', 'Mass', 'Hernia', 'Lung Lesion', 'Fracture', 'Lung Opacity', 'Enlarged Cardiomediastinum'],
        op_threshs=[0.51570356, 0.50444704, 0.53787947, 0.50723547, 0.5025118, 0.5035252, 0.5038076, 0.51862943, 0.5078151, 0.50724894, 0.5056339, 0.510706, 0.5053923, 0.5020846, None, 0.5080557, 0.5138526, None]),
}


def xrv_weights_info(name: str) -> dict[str, Any]:
    """A copy of the table entry of torchxrayvision weights ``name`` (e.g. "densenet121-res224-all").

    torchxrayvision itself is never imported: its import installs a global
    ``warnings.filterwarnings("ignore")``. Raises KeyError naming the known weights."""
    if name not in XRV_WEIGHTS:
        raise KeyError(f"unknown torchxrayvision weights {name!r}; known: {', '.join(XRV_WEIGHTS)}")
    v = XRV_WEIGHTS[name]
    return dict(v, labels=list(v["labels"]), op_threshs=list(v["op_threshs"]))
