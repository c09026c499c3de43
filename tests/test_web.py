"""The node's web side (issue 12): DICOMweb over real HTTP, the bearer token, bad requests.

The node runs in this process with its web server on a free loopback port (``Node.start(web=
True)``); studies arrive by C-STORE (dcmtk's storescu) or STOW-RS and are analysed by the
node's own work role. Every request is real HTTP (``http.client``), so what is checked is what
a viewer or a script gets.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import http.client
import io
import json
import os
import secrets
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import cv2
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pacs_node.config import DeliverySettings, Peer, WebSettings
from storage.models import Delivery, Instance, Job, Result
from tests import scu
from tests.conftest import CR_CHEST, CT_SERIES, make_config
from tests.orthanc import DCMTK, dcmtk_available, free_port, wait_for
from tests.processes import NodeProcess

TOKEN = "t0ken-" + "x" * 20


def request(
    url: str,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One real HTTP request; *path* is sent as it is (no normalising)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get_json(url: str, path: str, **kw: Any) -> Any:
    status, headers, body = request(url, path, **kw)
    assert status == 200, (path, status, body[:300])
    assert headers["content-type"].startswith("application/dicom+json")
    return json.loads(body)


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(content type, payload) of each part, read by the standard library's MIME parser (not
    the node's own reader)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart()
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in message.iter_parts()]


def stow_body(parts: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = secrets.token_hex(12)
    out = io.BytesIO()
    for kind, data in parts:
        out.write(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f'multipart/related; type="application/dicom"; boundary={boundary}', out.getvalue()


def value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def cr_copy(tmp_path: Path, patient: str) -> Path:
    """The chest X-ray as a new instance of a new study of patient *patient*."""
    ds = pydicom.dcmread(CR_CHEST)
    ds.PatientID, ds.PatientName = patient, f"Web^{patient}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    path = tmp_path / f"{patient}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def web_node(start_node, tmp_path: Path, **web: Any):
    config = replace(make_config(tmp_path), web=WebSettings(port=0, **web))
    return start_node(config, web=True)


def count(node, model: type) -> int:
    with node.db.read() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_qido_and_wado_answer_what_c_store_brought_and_the_node_found(start_node, tmp_path):
    node = web_node(start_node, tmp_path)
    url = node.web.url
    path = cr_copy(tmp_path, "QIDO-1")
    assert scu.store(node.port, [path])[0].Status == 0
    assert node.run_pending() == 1
    source = pydicom.dcmread(path)
    study = str(source.StudyInstanceUID)

    # QIDO-RS: the same matching as C-FIND (exact, wildcard, UID list), and nothing else
    (found,) = get_json(url, "/dicomweb/studies?PatientID=QIDO-1")
    assert value(found, "0020000D") == study
    assert value(found, "00081190").endswith(f"/dicomweb/studies/{study}")
    assert set(found["00080061"]["Value"]) >= {"CR", "SR"}
    assert get_json(url, "/dicomweb/studies?PatientName=web*")[0] == found  # PN: any case
    assert get_json(url, f"/dicomweb/studies?StudyInstanceUID=1.2.3,{study}") == [found]
    assert get_json(url, "/dicomweb/studies?PatientID=nobody") == []
    series = get_json(url, f"/dicomweb/studies/{study}/series")
    descriptions = {
        value(s, "00080060"): s.get("0008103E", {}).get("Value", [""])[0] for s in series
    }
    assert descriptions["CR"] == "" and "not for diagnostic use" in descriptions["SR"]
    assert len(get_json(url, f"/dicomweb/studies/{study}/series?limit=2")) == 2
    assert len(get_json(url, f"/dicomweb/studies/{study}/series?limit=2&offset=3")) == 1
    (sr_series,) = get_json(url, f"/dicomweb/studies/{study}/series?Modality=SR")
    sr_series_uid = value(sr_series, "0020000E")
    (sr,) = get_json(url, f"/dicomweb/studies/{study}/series/{sr_series_uid}/instances")
    assert value(sr, "00080016") == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert len(get_json(url, f"/dicomweb/instances?StudyInstanceUID={study}")) == 4

    # WADO-RS: the stored file, byte for byte
    cr_uid, cr_series = str(source.SOPInstanceUID), str(source.SeriesInstanceUID)
    base = f"/dicomweb/studies/{study}/series/{cr_series}/instances/{cr_uid}"
    status, headers, body = request(url, base, headers={"Accept": "multipart/related; "
                                    'type="application/dicom"'})  # fmt: skip
    assert status == 200
    ((kind, data),) = multipart_parts(headers["content-type"], body)
    with node.db.read() as session:
        stored = session.scalars(select(Instance.path).where(Instance.sop_instance_uid == cr_uid))
        assert data == node.files.abspath(stored.one()).read_bytes()
    assert kind == "application/dicom"
    status, headers, body = request(url, f"/dicomweb/studies/{study}")
    assert status == 200 and len(multipart_parts(headers["content-type"], body)) == 4

    # metadata: the header as DICOM JSON, Pixel Data by reference, the reference resolves
    (meta,) = get_json(url, base + "/metadata")
    assert value(meta, "00100020") == "QIDO-1" and value(meta, "00280010") == source.Rows
    pixel_url = meta["7FE00010"]["BulkDataURI"]
    status, headers, body = request(url, urlsplit(pixel_url).path)
    ((_, pixels),) = multipart_parts(headers["content-type"], body)
    assert pixels == source.PixelData
    (sr_meta,) = get_json(url, f"/dicomweb/studies/{study}/series/{sr_series_uid}/metadata")
    assert "not for diagnostic use" in json.dumps(sr_meta).lower()
    assert all(e.get("Value") != [] for e in sr_meta.values())  # PS3.18 F.2.5: no empty Value

    # frames in the stored syntax, a rendered thumbnail that is the image
    status, headers, body = request(url, base + "/frames/1")
    assert status == 200
    ((kind, frame),) = multipart_parts(headers["content-type"], body)
    assert kind == "application/octet-stream" and frame == source.PixelData
    status, headers, body = request(url, base + "/rendered")
    assert status == 200 and headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert image.shape == (source.Rows, source.Columns) and image.std() > 10
    status, headers, body = request(url, base + "/thumbnail", headers={"Accept": "image/jpeg"})
    assert status == 200 and body[:2] == b"\xff\xd8"


def test_stow_stores_and_queues_exactly_like_c_store(start_node, tmp_path):
    node = web_node(start_node, tmp_path)
    url = node.web.url
    slices = CT_SERIES[:3]
    kind, body = stow_body(
        [("application/dicom", cr_copy(tmp_path, "STOW-1").read_bytes())]
        + [("application/dicom", p.read_bytes()) for p in slices]
    )
    status, headers, answer = request(
        url, "/dicomweb/studies", method="POST", headers={"Content-Type": kind}, body=body
    )
    assert status == 200, answer
    stored = json.loads(answer)["00081199"]["Value"]
    assert len(stored) == 4 and "00081198" not in json.loads(answer)
    assert {value(s, "00081155") for s in stored} >= {str(pydicom.dcmread(p).SOPInstanceUID)
                                                      for p in slices}  # fmt: skip
    for item in stored:  # each Retrieve URL gives the instance back
        assert request(url, urlsplit(value(item, "00081190")).path)[0] == 200
    with node.db.read() as session:
        jobs = session.scalars(select(Job)).all()
    assert len(jobs) == 2  # one per series, as for C-STORE
    assert node.run_pending() >= 1
    with node.db.read() as session:
        labels = session.scalars(select(Result.label)).all()
    assert labels  # the radiograph was analysed (the 3-slice CT may be too short to)
    (found,) = get_json(url, "/dicomweb/studies?PatientID=STOW-1")
    assert "SR" in found["00080061"]["Value"]
    assert list(node.files.tmp_dir.iterdir()) == []  # no part left behind


def test_stow_refuses_bad_parts_with_reasons_and_stores_the_good(start_node, tmp_path):
    node = web_node(start_node, tmp_path, max_upload_bytes=4 * 2**20)
    url = node.web.url
    good = cr_copy(tmp_path, "STOW-2").read_bytes()
    truncated = cr_copy(tmp_path, "STOW-3").read_bytes()[:-5000]
    kind, body = stow_body(
        [
            ("application/dicom", good),
            ("application/dicom", b"this is not DICOM at all" * 10),
            ("application/dicom", truncated),
            ("image/png", b"\x89PNG\r\n"),
        ]
    )
    status, _, answer = request(
        url, "/dicomweb/studies", method="POST", headers={"Content-Type": kind}, body=body
    )
    assert status == 202, answer  # some stored, some not (PS3.18 10.5.3)
    result = json.loads(answer)
    assert len(result["00081199"]["Value"]) == 1
    failed = result["00081198"]["Value"]
    assert [value(f, "00081197") for f in failed] == [0xC000, 0xA900, 0xA900]
    reasons = [value(f, "00000902") for f in failed]
    assert "not a DICOM file" in reasons[0] and "image/png" in reasons[2], reasons
    assert count(node, Instance) == 1
    assert list(node.files.tmp_dir.iterdir()) == []

    # the study in the path must be the instance's study
    other = "1.2.826.0.1.3680043.8.498.1"
    kind, body = stow_body([("application/dicom", cr_copy(tmp_path, "STOW-4").read_bytes())])
    status, _, answer = request(
        url, f"/dicomweb/studies/{other}", method="POST", headers={"Content-Type": kind},
        body=body,
    )  # fmt: skip
    assert status == 409 and "belongs to study" in answer.decode()

    # wrong content type, broken multipart, no part, over the size limit: 4xx, nothing stored
    big = stow_body([("application/dicom", bytes(5 * 2**20))])
    cases = [
        ({"Content-Type": "application/json"}, b"{}", 415),
        ({"Content-Type": 'multipart/related; type="application/dicom"'}, good, 400),
        ({"Content-Type": kind}, body[: len(body) // 2], 400),  # ends inside a part
        ({"Content-Type": kind.replace("boundary=", "boundary=x")}, body, 400),
        ({"Content-Type": kind}, b"--" + kind.split("boundary=")[1].encode() + b"--\r\n", 400),
        (dict(zip(["Content-Type"], [big[0]], strict=True)), big[1], 413),
    ]
    for headers, data, expected in cases:
        status, _, answer = request(
            url, "/dicomweb/studies", method="POST", headers=headers, body=data
        )
        assert status == expected, (headers, status, answer[:200])
        assert answer.strip(), "every refusal says why"
    # ... and a body over the limit that does not say its length (chunked): cut off at the limit
    conn = http.client.HTTPConnection("127.0.0.1", node.web.port, timeout=60)
    chunks = (big[1][i : i + 65536] for i in range(0, len(big[1]), 65536))
    conn.request("POST", "/dicomweb/studies", body=chunks, headers={"Content-Type": big[0]},
                 encode_chunked=True)  # fmt: skip
    response = conn.getresponse()
    assert response.status == 413 and b"over" in response.read()
    conn.close()
    assert count(node, Instance) == 1
    assert list(node.files.tmp_dir.iterdir()) == []
    assert request(url, "/healthz")[0] == 200


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/dicomweb/studies/1.2.3", 404),  # a UID the node does not hold
        ("/dicomweb/studies/../../etc/passwd", 404),  # no route: never a file outside storage
        ("/dicomweb/studies/..%2F..%2Fetc%2Fpasswd", 404),
        ("/dicomweb/studies/1.2.3;rm/metadata", 400),  # not a UID
        ("/dicomweb/studies/1.2.3/series/abc/metadata", 400),
        ("/dicomweb/studies?NoSuchKeyword=1", 400),
        ("/dicomweb/studies?limit=-1", 400),
        ("/dicomweb/studies?StudyDate=2020-01-01", 400),  # not a DICOM date
        ("/dicomweb/studies?fuzzymatching=true", 400),
        ("/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/0", 400),
        ("/dicomweb/studies/1.2.3/series/1.2.4/instances/1.2.5/bulkdata/zz", 400),
    ],
)
def test_bad_requests_get_a_4xx_with_a_reason(start_node, tmp_path, path, expected):
    node = web_node(start_node, tmp_path)
    status, _, body = request(node.web.url, path)
    assert status == expected, (status, body[:300])
    assert body.strip()
    assert request(node.web.url, "/healthz")[0] == 200


def test_bearer_token_is_required_when_set(start_node, tmp_path):
    node = web_node(start_node, tmp_path, token=TOKEN)
    url = node.web.url
    wrong_basic = "Basic " + base64.b64encode(b"admin:not-the-token").decode()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": wrong_basic},
        {"Authorization": "Basic %%%"},
    ):
        status, _, _ = request(url, "/dicomweb/studies", headers=headers)
        assert status == 401
        assert request(url, "/", headers=headers)[0] == 401
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", "/")
    challenges = conn.getresponse().headers.get_all("www-authenticate")
    conn.close()
    assert sorted(c.split()[0] for c in challenges) == ["Basic", "Bearer"]
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert get_json(url, "/dicomweb/studies", headers=good) == []
    basic = {"Authorization": "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()}
    assert get_json(url, "/dicomweb/studies", headers=basic) == []
    # a browser's cached credentials on a request another site made it send: refused
    cross = {**basic, "Sec-Fetch-Site": "cross-site"}
    assert request(url, "/dicomweb/studies", headers=cross)[0] == 401
    # audited: wrong tokens, once a minute per client (with how many more); no credentials
    # at all (every browser's first request) is not an attack
    from tests.test_audit import messages, of

    trail = of(messages(node.config.node.storage_dir / "audit" / "audit.log"), "110114")
    assert len(trail) == 1
    said = trail[0].find("EventIdentification/EventOutcomeDescription").text
    assert said.startswith("wrong token") and "/dicomweb/studies" in said


def test_slow_http_clients_do_not_starve_dimse(start_node, tmp_path):
    """Connections that send half a request and wait (slowloris), more than the server serves at
    once: C-ECHO and C-STORE are answered all the while, and HTTP serves again once they go."""
    node = web_node(start_node, tmp_path, max_connections=8)
    parts = urlsplit(node.web.url)
    hostile = []
    try:
        for _ in range(40):
            sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
            sock.sendall(b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\n")  # never finished
            hostile.append(sock)
        started = time.monotonic()
        assert scu.echo(node.port) == 0x0000
        assert scu.store(node.port, [cr_copy(tmp_path, "SLOW-1")])[0].Status == 0
        assert time.monotonic() - started < 30  # bounded: not a timing assertion of speed
    finally:
        for sock in hostile:
            sock.close()
    for _ in range(100):  # bounded
        try:
            if request(node.web.url, "/healthz")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    assert get_json(node.web.url, "/dicomweb/studies?PatientID=SLOW-1")


@pytest.mark.slow
def test_serve_runs_the_web_role_beside_the_dimse_ones(tmp_path):
    """``pacs-node serve`` with ``[web]``: its own process; a study sent by STOW-RS is
    analysed by the work role and its SR is found by QIDO-RS."""
    port, web_port = free_port(), free_port()
    node = NodeProcess(
        tmp_path,
        f'[node]\nport = {port}\nstorage_dir = "data"\n'
        f'[worker]\npoll_interval_s = 0.2\n[web]\nport = {web_port}\ntoken = "{TOKEN}"\n',
    )
    node.start()
    try:
        wait_for(lambda: "web role: DICOMweb on" in node.log(), timeout_s=60, what="web role")
        assert node.role_pids("web")
        url, auth = f"http://127.0.0.1:{web_port}", {"Authorization": f"Bearer {TOKEN}"}
        kind, body = stow_body([("application/dicom", cr_copy(tmp_path, "SERVE-1").read_bytes())])
        status, _, answer = request(
            url, "/dicomweb/studies", method="POST", body=body,
            headers={"Content-Type": kind, **auth},
        )  # fmt: skip
        assert status == 200, answer

        def analysed() -> bool:
            (study,) = get_json(url, "/dicomweb/studies?PatientID=SERVE-1", headers=auth)
            return "SR" in study["00080061"]["Value"]

        wait_for(analysed, timeout_s=180, what="the SR of the study sent by STOW-RS")
    finally:
        assert node.stop() == 0


def test_metrics_count_what_the_node_did_in_prometheus_format(start_node, tmp_path):
    node = web_node(start_node, tmp_path)
    assert scu.store(node.port, [cr_copy(tmp_path, "METRICS-1")])[0].Status == 0
    # refused: an instance without its pixel data (twice), an association to a wrong AE title
    cut = pydicom.dcmread(cr_copy(tmp_path, "METRICS-2"))
    del cut.PixelData
    for name in ("cut-1", "cut-2"):
        cut.SOPInstanceUID = generate_uid()
        cut.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        assert scu.store(node.port, [tmp_path / f"{name}.dcm"])[0].Status == 0xA900
    assert not scu.association_accepted(node.port, calling="TESTSCU", called="NOTME")
    before = request(node.web.url, "/metrics")[2].decode()
    assert 'pacs_node_queue_depth{queue="jobs",state="queued"} 1.0' in before
    assert node.run_pending() == 1
    status, headers, body = request(node.web.url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert samples[("pacs_node_instances_received_total", (("modality", "CR"),))] == 1
    assert samples[("pacs_node_jobs_total", (("outcome", "done"),))] == 1
    assert samples[("pacs_node_queue_depth", (("queue", "jobs"), ("state", "queued")))] == 0
    analysed = (("le", "+Inf"), ("modality", "CR"), ("stage", "analysed"))
    assert samples[("pacs_node_stage_seconds_bucket", analysed)] == 1
    assert 0 < samples[("pacs_node_stage_seconds_sum", analysed[1:])] < 600
    expected = {
        (("reason", "no_pixel_data"), ("what", "instance")): 2,
        (("reason", "unknown_called_ae"), ("what", "association")): 1,
    }

    def refused() -> dict[Any, float] | None:  # the counts are written once a second
        body = request(node.web.url, "/metrics")[2].decode()
        got = {
            tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
            if s.name == "pacs_node_refused_total"
        }
        return got if got == expected else None

    assert wait_for(refused, timeout_s=10, what="the refusal counts") == expected
    model = (("model", "cxr-efficientnet-lite0"),)
    assert samples[("pacs_node_inference_seconds_count", model)] == 1
    # the model's own time is part of the job's, and not all of it
    assert (
        0
        < samples[("pacs_node_inference_seconds_sum", model)]
        < samples[("pacs_node_stage_seconds_sum", analysed[1:])]
    )


SEGMENTS = st.sampled_from(
    ["studies", "series", "instances", "metadata", "frames", "rendered", "bulkdata", "..",
     "%2e%2e", "%2F", "1.2.3", "7FE00010", "0", "1,2", "", "a" * 300, "%00", "\u00e9"]
)  # fmt: skip
PARAMS = st.sampled_from(
    ["PatientID", "StudyDate", "StudyTime", "Modality", "limit", "offset", "includefield",
     "00100010", "SOPInstanceUID", "fuzzymatching", "x"]
)  # fmt: skip
VALUES = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_server_error_or_store_anything(start_node, tmp_path):
    """Property-based (hypothesis): any path, query and body gets an answer under 500, nothing
    is stored from a body that is not DICOM, and the node keeps serving."""
    node = web_node(start_node, tmp_path, max_upload_bytes=2**20)
    url = node.web.url

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(
        segments=st.lists(SEGMENTS, max_size=8),
        params=st.lists(st.tuples(PARAMS, VALUES), max_size=4),
        post=st.booleans(),
        kind=st.sampled_from(
            [
                'multipart/related; type="application/dicom"; boundary=b',
                "application/dicom",
                "multipart/related",
                "text/plain",
                'multipart/related; boundary=""',
            ]
        ),  # fmt: skip
        body=st.binary(max_size=2000),
    )
    def check(segments, params, post, kind, body):
        path = "/dicomweb/" + "/".join(quote(s, safe="%,") for s in segments)
        if params:
            path += "?" + urlencode(params)
        if post:
            status, _, answer = request(url, path, method="POST", body=body,
                                        headers={"Content-Type": kind})  # fmt: skip
        else:
            status, _, answer = request(url, path)
        assert status < 500, (path, status, answer[:300])

    check()
    assert count(node, Instance) == 0
    assert list(node.files.tmp_dir.iterdir()) == []
    assert request(url, "/healthz")[0] == 200


@pytest.mark.slow
@pytest.mark.browser
def test_dashboard_in_a_browser_lists_the_study_and_retries_a_failed_delivery(start_node, tmp_path):
    """A study sent by dcmtk's storescu, its results owed to a peer that is down: the dashboard
    (headless Chromium) lists the result with its heatmap thumbnail and the failed delivery,
    and its Retry button requeues the delivery. The node has a token: the browser gives it as
    the HTTP Basic password it is asked for. The screenshot is kept in build/artifacts/."""
    from tests.test_ohif import ARTIFACTS, CHROMIUM, MODULES, ROOT

    missing = [str(p) for p in (CHROMIUM, MODULES / "playwright-core") if not p.exists()]
    if missing or not dcmtk_available():
        if os.environ.get("CI"):
            pytest.fail("CI must provide: " + ", ".join(missing or ["dcmtk"]))
        pytest.skip("needs " + ", ".join(missing or ["dcmtk"]))
    down = Peer(ae_title="PACS", host="127.0.0.1", port=free_port(), ask_completeness=False)
    config = replace(
        make_config(tmp_path, peers=(down,)),
        web=WebSettings(port=0, token=TOKEN),
        delivery=DeliverySettings(max_attempts=1, backoff_initial_s=0),
    )
    node = start_node(config, web=True)
    path = cr_copy(tmp_path, "DASH-1")
    subprocess.run(
        [DCMTK["storescu"], "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(node.port),
         str(path)],
        check=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"},
    )  # fmt: skip
    node.run_pending()
    with node.db.read() as session:
        failed = session.scalars(select(Delivery).where(Delivery.state == "failed")).all()
    assert failed, "the peer is down: its deliveries fail"
    target = failed[0].id
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "dashboard.png"
    run = subprocess.run(
        ["node", str(ROOT / "tests" / "browser" / "dashboard_check.cjs"), node.web.url + "/",
         str(screenshot), f"delivery-{target}"],
        env={**os.environ, "NODE_PATH": str(MODULES), "CHROMIUM": str(CHROMIUM),
             "DASHBOARD_PASSWORD": TOKEN},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    page = json.loads(run.stdout.strip().splitlines()[-1])
    assert not page["errors"], page["errors"]
    source = pydicom.dcmread(path)
    assert str(source.StudyInstanceUID) in page["text"] and "DASH-1" in page["text"]
    assert "not for diagnostic use" in page["text"]
    assert page["images"] and all(ok and width > 0 for ok, width in page["images"])
    assert page["buttons"] == len(failed)
    assert page["outcome"].strip() == f"delivery {target} requeued"
    with node.db.read() as session:
        assert session.get(Delivery, target).state == "queued"
    assert screenshot.stat().st_size > 10_000
    # the button's POST without the page's header (a form on another site): refused
    status, _, _ = request(node.web.url, "/dashboard/retry", method="POST",
                           body=b'{"kind": "delivery", "id": 1}',
                           headers={"Content-Type": "application/json",
                                    "Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert status == 403


def test_https_with_the_certificate_of_dicom_tls(start_node, tmp_path, pki):
    """With [tls] on, the web server speaks HTTPS with the same certificate: a client that
    trusts the CA gets answers (URLs in them say https), one that does not is refused at the
    handshake, and nothing is served in the clear."""
    import ssl

    from tests.pki import tls_settings

    tls = tls_settings(pki)
    node = start_node(replace(make_config(tmp_path), tls=tls, web=WebSettings(port=0)), web=True)
    assert node.web.url.startswith("https://127.0.0.1:")
    path = cr_copy(tmp_path, "HTTPS-1")
    assert scu.store(node.port, [path])[0].Status == 0
    port = urlsplit(node.web.url).port
    trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=trusted, timeout=30)
    try:
        conn.request("GET", "/dicomweb/studies?PatientID=HTTPS-1")
        response = conn.getresponse()
        assert response.status == 200
        (study,) = json.loads(response.read())
    finally:
        conn.close()
    assert study["00081190"]["Value"][0].startswith(f"https://127.0.0.1:{port}/dicomweb/studies/")
    untrusted = ssl.create_default_context()  # the system's CAs, not the node's
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=untrusted, timeout=30)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/healthz")
    conn.close()
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        request(f"http://127.0.0.1:{port}", "/healthz")  # plain HTTP to the HTTPS port
