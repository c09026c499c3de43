"""Peak memory of the receive role for one large instance, streamed to disk or held whole.

    python benchmarks/memory.py [--mib 500]

One CT instance of about *mib* MiB (a 16-bit image of n x n pixels) is sent by dcmtk's storescu
to ``pacs-node receive``, once with ``node.stream_to_disk = true`` (the default: pynetdicom
writes the data set to a file fragment by fragment) and once with it false (the data set is
assembled in memory, decoded and encoded again, as before). Reported: the receive process's
peak RSS (VmHWM) before and after the C-STORE, and the store's duration, for each.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.orthanc import DCMTK, dcmtk_env, free_port  # noqa: E402
from tests.processes import NodeProcess, peak_rss_mib  # noqa: E402


def big_ct(path: Path, mib: int) -> int:
    side = int(math.sqrt(mib * 2**20 / 2))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "BIG^IMAGE", "BIG1"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((side, side), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def measure(tmp: Path, name: str, stream: bool, instance: Path) -> tuple[float, float, float]:
    port = free_port()
    workdir = tmp / name
    workdir.mkdir()
    node = NodeProcess(
        workdir,
        f'[node]\nport = {port}\nstorage_dir = "data"\n'
        f"stream_to_disk = {'true' if stream else 'false'}\n",
        "receive",
    )
    node.start()
    assert node.proc is not None
    before = peak_rss_mib(node.proc.pid)
    start = time.perf_counter()
    run = subprocess.run(
        [DCMTK["storescu"], "-aec", "AINODE", "127.0.0.1", str(port), str(instance)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    after = peak_rss_mib(node.proc.pid)
    node.stop()
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-500:])
    return before, after, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        instance = tmp / "big.dcm"
        size = big_ct(instance, args.mib)
        print(f"one CT instance of {size / 2**20:.0f} MiB")
        for name, stream in (("streamed to disk", True), ("held in memory", False)):
            before, after, seconds = measure(tmp, name.replace(" ", "-"), stream, instance)
            print(
                f"{name:17s}: receive role peak RSS {before:.0f} MiB before, {after:.0f} MiB "
                f"after (+{after - before:.0f}); stored in {seconds:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
