"""JPEG 2000 DICOM frames through imagecodecs (``cxrkit[fast]``): the same stored values as
pydicom's own decoding plugins, on the real files of ../shared/data and on frames encoded here
(8-, 12- and 16-bit, odd sizes); anything it should not take is left to pydicom."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("imagecodecs")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import pixel_array  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402

from cxrkit.io.dicom import _j2k_imagecodecs  # noqa: E402

FILES = ["dicom/nema-rg1/RG1_J2KR.dcm", "dicom/nema-rg1/RG1_J2KI.dcm", "dicom/chest-dx-966-j2k.dcm"]


def _uid(ds) -> str:
    return str(ds.file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("rel", FILES)
def test_real_files_equal_pydicom(shared_data, rel):
    path = shared_data / rel
    if not path.exists():
        pytest.skip(f"{path} not found")
    ds = pydicom.dcmread(path)
    got = _j2k_imagecodecs(ds, _uid(ds))
    ref = pixel_array(ds, index=0)
    assert got is not None and got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)


def _encoded(arr: np.ndarray, bits_stored: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.BitsAllocated = 8 if arr.dtype == np.uint8 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelData = arr.tobytes()
    ds.compress(JPEG2000Lossless, arr, encoding_plugin="pylibjpeg")
    return ds


# OpenJPEG's encoder (6 resolution levels) wants both sides >= 32
@pytest.mark.parametrize("dtype,bits,hw", [(np.uint8, 8, (37, 53)), (np.uint16, 12, (64, 33)),
                                           (np.uint16, 16, (33, 96)), (np.uint16, 10, (45, 32))])
def test_encoded_here_equal_pydicom(dtype, bits, hw):
    rng = np.random.default_rng(bits)
    arr = rng.integers(0, 2**bits, hw).astype(dtype)
    ds = _encoded(arr, bits)
    got = _j2k_imagecodecs(ds, _uid(ds))
    ref = pixel_array(ds, index=0)
    assert got is not None and got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, arr)


def test_left_to_pydicom():
    arr = np.arange(40 * 36, dtype=np.uint16).reshape(40, 36)
    ds = _encoded(arr, 12)
    assert _j2k_imagecodecs(ds, "1.2.840.10008.1.2.4.201") is None  # HTJ2K: pydicom's plugins
    assert _j2k_imagecodecs(ds, "1.2.840.10008.1.2.1") is None  # not JPEG 2000
    signed = _encoded(arr, 12)
    signed.PixelRepresentation = 1
    assert _j2k_imagecodecs(signed, _uid(signed)) is None
    from pydicom.encaps import encapsulate, get_frame

    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    frame[len(frame) // 2:] = bytes(len(frame) - len(frame) // 2)  # damaged codestream
    ds.PixelData = encapsulate([bytes(frame[: len(frame) // 2])])
    assert _j2k_imagecodecs(ds, _uid(ds)) is None  # pydicom then raises the typed error
