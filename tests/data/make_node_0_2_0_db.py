"""Made once with pacs-node 0.2.0 (commit 9f8a744): a database holding studies, jobs in every
state, results and deliveries, for the Alembic upgrade test."""
import os
import shutil
import sys
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, ".")
from pacs_node.config import Config, DeliverySettings, NodeSettings, Peer, WorkerSettings
from pacs_node.node import Node
from tests.conftest import CR_CHEST, CT_SERIES, DICOM
from tests.scu import store

root = Path("/tmp/v020"); shutil.rmtree(root, ignore_errors=True)
cfg = Config(node=NodeSettings(host="127.0.0.1", port=0, storage_dir=root),
             peers=(Peer("TESTSCU", "127.0.0.1", 1, send_results=True),),
             worker=WorkerSettings(ct_quiet_period_s=0.0, retry_backoff_s=0.0),
             delivery=DeliverySettings(max_attempts=1))
node = Node(cfg); node.start(scheduler=False, preload_models=False)
others = sorted((DICOM).rglob("*.dcm"))
sr = [p for p in others if "SR" in p.name.upper()][:1]
print(store(node.port, [CR_CHEST] + CT_SERIES[:4] + sr))
node.run_pending()
print(store(node.port, CT_SERIES[10:12]))
node.stop()
