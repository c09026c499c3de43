"""One path from an :class:`~ai.analysis.Analysis` to the DICOM objects that report it.

The node's worker and ``pacs-node classify --output`` both call :func:`build_results`, so the
same input gives the same SR and secondary captures, with the same UIDs, wherever it is analysed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from ai.analysis import Analysis
from ai.outputs import (
    Region,
    build_not_analysed_sr,
    build_pm,
    build_sc,
    build_sr,
    hot_spot,
    overlay_lines,
    render_overlay,
    source_header,
)

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PM_SERIES_NUMBER = 9903


def derived_uid(*parts: str) -> str:
    """A UID fixed by its inputs: a retry makes the same instances, not duplicates.

    A ``2.25`` UID (PS3.5 B.2) from 128 bits of a SHA-256 over the parts.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def build_results(
    analysis: Analysis, *, software_version: str, parametric_maps: bool = True
) -> list[Dataset]:
    """The SR (first), then per explained image a secondary capture (the heatmap burned in,
    for viewers that show only images) and, with *parametric_maps*, a Parametric Map (the
    heatmap as data, which viewers overlay and toggle), for a DICOM analysis.

    UIDs derive from the model name and version and the SOP Instance UIDs of the images used.
    """
    prediction = analysis.prediction
    if not analysis.used:
        raise ValueError("build_results needs an analysis of DICOM datasets")
    sources = sorted(str(ds.SOPInstanceUID) for ds in analysis.used)
    key = [prediction.model_name, prediction.model_version, *sources]
    explained = []
    for item in analysis.explained:
        if item.dataset is None:
            raise ValueError(f"explained image {item.name} has no dataset")
        explained.append((item, item.dataset))
    headers: dict[int, tuple[Dataset, list[DataElement]]] = {}  # each source's, made once

    def prepared(ds: Dataset) -> tuple[Dataset, list[DataElement]]:
        if id(ds) not in headers:
            headers[id(ds)] = source_header(ds)
        return headers[id(ds)]

    boxes = [(ds, hot_spot(item.heatmap)) for item, ds in explained]
    regions = [Region(ds, box) for ds, box in boxes if box is not None]
    sr = build_sr(
        analysis.used,
        prediction,
        regions=regions,
        series_instance_uid=derived_uid("sr-series", *key),
        sop_instance_uid=derived_uid("sr", *key),
        series_number=SR_SERIES_NUMBER,
        software_version=software_version,
        prepared=prepared(analysis.used[0]),
    )
    outputs = [sr]
    sc_series_uid = derived_uid("sc-series", *key)
    pm_series_uid = derived_uid("pm-series", *key)
    for number, (item, source) in enumerate(explained, start=1):
        overlay = render_overlay(
            item.image, item.heatmap, overlay_lines(prediction, analysis.caption(item))
        )
        outputs.append(
            build_sc(
                source,
                overlay,
                prediction,
                series_instance_uid=sc_series_uid,
                sop_instance_uid=derived_uid("sc", item.name, *key),
                series_number=SC_SERIES_NUMBER,
                instance_number=number,
                software_version=software_version,
                prepared=prepared(source),
            )
        )
        if parametric_maps:
            outputs.append(
                build_pm(
                    source,
                    item.heatmap,
                    prediction,
                    series_instance_uid=pm_series_uid,
                    sop_instance_uid=derived_uid("pm", item.name, *key),
                    series_number=PM_SERIES_NUMBER,
                    instance_number=number,
                    software_version=software_version,
                    prepared=prepared(source),
                )
            )
    return outputs


def build_not_analysed(
    sources: Sequence[Dataset], reason: str, *, model_name: str, software_version: str
) -> Dataset:
    """The SR that says the node did not analyse *sources* (one series), and why.

    Its UIDs derive from the model that would have run (or "none"), the reason and the images,
    so a retry makes the same SR, and an analysis after more images arrived a new one.
    """
    key = [model_name or "none", "not-analysed", reason,
           *sorted(str(ds.SOPInstanceUID) for ds in sources)]  # fmt: skip
    return build_not_analysed_sr(
        sources,
        reason,
        series_instance_uid=derived_uid("sr-series", *key),
        sop_instance_uid=derived_uid("sr", *key),
        series_number=SR_SERIES_NUMBER,
        software_version=software_version,
    )
