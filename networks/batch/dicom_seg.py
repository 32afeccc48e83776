"""DICOM Segmentation objects (highdicom) for labels predicted on a DICOM series, referencing that series.

The label volume is on the series' own grid (:mod:`networks.batch.volumes` restores it there), so each source
slice's frame is read off the label at the voxel of every source pixel through the label's affine: no resampling, and
the frame order and geometry are those of the source images.
"""

from __future__ import annotations

import os

import numpy as np

from networks.data import write_atomic_with

REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")


def source_slices(folder: str, series_uid: str) -> list:
    """The headers of the series' image slices in ``folder``, ordered along the slice normal. Raises ValueError, naming
    the folder, when the series lacks the UIDs a DICOM SEG must reference."""
    import pydicom

    slices = []
    for name in sorted(os.listdir(folder)):
        try:
            ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
        except Exception:
            continue
        if str(getattr(ds, "SeriesInstanceUID", "") or "") == series_uid and "ImagePositionPatient" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"{folder}: no image slices of series {series_uid!r} found for the DICOM SEG.")
    missing = [key for key in REQUIRED_UIDS if not str(getattr(slices[0], key, "") or "")]
    if missing:
        raise ValueError(f"{folder}: --dicom_seg needs the series to carry {', '.join(missing)} (an anonymised export "
                         f"without UIDs cannot be referenced); run without --dicom_seg for a NIfTI label.")
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64), (2, 3)))
    return sorted(slices, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=np.float64))))


def label_frames(label: np.ndarray, affine: np.ndarray, slices: list) -> np.ndarray:
    """``(len(slices), rows, cols)`` label values at every source pixel; ``affine`` maps label voxels to RAS mm."""
    to_voxel = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    frames = []
    for ds in slices:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        rows, columns = np.mgrid[0 : int(ds.Rows), 0 : int(ds.Columns)]
        lps = (np.asarray(ds.ImagePositionPatient, dtype=np.float64)
               + columns[..., None] * column_spacing * orientation[:3]
               + rows[..., None] * row_spacing * orientation[3:])
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = np.rint(ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(np.int64)
        if (voxel < 0).any() or (voxel >= np.array(label.shape)).any():
            raise ValueError("the label volume does not cover the source series (geometry mismatch).")
        frames.append(label[voxel[..., 0], voxel[..., 1], voxel[..., 2]])
    return np.stack(frames).astype(np.uint8)


def _segment_type(name: str):
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, name.split("_")[-1].capitalize(), None) or codes.SCT.Organ  # right_kidney: Kidney


def write_dicom_seg(label, folder: str, series_uid: str, labels: dict[int, str], output_path: str,
                    algorithm: str, version: str) -> None:
    """Write a binary DICOM SEG (one segment per label of ``labels``) for ``label`` on the series in ``folder``,
    under a temporary name first."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    array = np.asarray(label.detach().cpu().numpy() if hasattr(label, "detach") else label)
    array = array[0] if array.ndim == 4 else array
    slices = source_slices(folder, series_uid)
    frames = label_frames(array, np.asarray(label.affine), slices)
    algorithm_id = hd.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                                      family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name.replace("_", " "),
            segmented_property_category=codes.SCT.Organ, segmented_property_type=_segment_type(name),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm_id,
            tracking_uid=hd.UID(), tracking_id=f"{algorithm} {name}")
        for number, name in sorted(labels.items()) if number > 0
    ]
    seg = hd.seg.Segmentation(
        source_images=slices, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="LiteMed Bundles",
        manufacturer_model_name=algorithm, software_versions=version, device_serial_number="none",
        series_description=f"{algorithm} segmentation (research use only)")
    write_atomic_with(output_path, seg.save_as, ".dcm")
