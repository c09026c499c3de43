"""C-FIND over many studies: the node against Orthanc, the same studies in both.

    python benchmarks/find.py [--studies 10000] [--rounds 3]

*studies* one-image CT studies (8 x 8 pixels, so that the query, not the storage, is measured)
with varied patients and dates are stored in Orthanc by dcmtk's storescu and indexed into the
node's database through its own ingest code (``storage.ingest.record_instance``, what C-STORE
runs). The node answers as ``pacs-node receive``. dcmtk's findscu (TCP_NODELAY=1) then asks both
the same queries, rounds interleaved: every study; a patient name with a wildcard (1 % of the
studies); a date range (about a fifth). Reported: seconds per query (median), and node/Orthanc.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.db import Database  # noqa: E402
from storage.ingest import IndexCache, record_instance  # noqa: E402
from tests.orthanc import DCMTK, OrthancServer, dcmtk_env, free_port  # noqa: E402
from tests.processes import NodeProcess  # noqa: E402

QUERIES = {
    "all studies": ["-k", "PatientName", "-k", "StudyDate", "-k", "StudyInstanceUID"],
    "PatientName=SMITH*": ["-k", "PatientName=SMITH*", "-k", "StudyInstanceUID"],
    "StudyDate range": ["-k", "StudyDate=20230101-20231231", "-k", "StudyInstanceUID"],
}


def study(i: int, rng: random.Random) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    family = "SMITH" if i % 100 == 0 else rng.choice(["DOE", "MILLER", "GARCIA", "NGUYEN"])
    ds.PatientName = f"{family}^PAT{i:05d}"
    ds.PatientID = f"P{i:06d}"
    ds.StudyDate = f"{rng.randint(2019, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"A{i:07d}"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    return ds


def findscu(port: int, called: str, keys: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    run = subprocess.run(
        [DCMTK["findscu"], "-S", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port),
         "-k", "QueryRetrieveLevel=STUDY", *keys],
        env=dcmtk_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-500:])
    return seconds, run.stderr.count("Find Response:")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files_dir = tmp / "in"
        files_dir.mkdir()
        storage = tmp / "node" / "data"
        storage.mkdir(parents=True)
        db = Database(f"sqlite:///{storage / 'node.sqlite3'}")
        cache = IndexCache()
        start = time.perf_counter()
        for i in range(args.studies):
            ds = study(i, rng)
            ds.save_as(files_dir / f"{i:06d}.dcm", enforce_file_format=True)
            with db.session() as session:
                record_instance(
                    session, ds, relpath=f"x/{i}.dcm", size_bytes=0,
                    transfer_syntax_uid=ExplicitVRLittleEndian, source_ae="BENCH", cache=cache,
                )  # fmt: skip
        db.dispose()
        print(f"{args.studies} studies made and indexed in {time.perf_counter() - start:.0f} s")
        node_port = free_port()
        node = NodeProcess(
            tmp / "node", f'[node]\nport = {node_port}\nstorage_dir = "data"\n', "receive"
        )
        with OrthancServer(tmp / "orthanc", extra_config={"DicomAlwaysAllowFind": True}) as orthanc:
            start = time.perf_counter()
            subprocess.run(
                [DCMTK["storescu"], "-aec", orthanc.aet, "+sd", "127.0.0.1",
                 str(orthanc.dicom_port), str(files_dir)],
                env=dcmtk_env(), check=True, capture_output=True,
            )  # fmt: skip
            print(f"stored in Orthanc in {time.perf_counter() - start:.0f} s")
            node.start()
            times: dict[tuple[str, str], list[float]] = {}
            counts: dict[tuple[str, str], int] = {}
            try:
                for _ in range(args.rounds):
                    for name, keys in QUERIES.items():
                        for target, port, called in (
                            ("node", node_port, "AINODE"),
                            ("orthanc", orthanc.dicom_port, orthanc.aet),
                        ):
                            seconds, n = findscu(port, called, keys)
                            times.setdefault((name, target), []).append(seconds)
                            counts[(name, target)] = n
            finally:
                node.stop()
    print(f"\nC-FIND over {args.studies} studies, median of {args.rounds} rounds")
    for name in QUERIES:
        node_s = statistics.median(times[(name, "node")])
        orthanc_s = statistics.median(times[(name, "orthanc")])
        print(
            f"{name:20s}: node {node_s:.3f} s ({counts[(name, 'node')]} matches), Orthanc "
            f"{orthanc_s:.3f} s ({counts[(name, 'orthanc')]} matches); node/Orthanc time "
            f"{node_s / orthanc_s:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
