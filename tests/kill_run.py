"""Run the influence flow in this process (workers as threads of an in-process Dask cluster), so
that ``killer://`` outputs can SIGKILL the whole run at a chosen write. Usage:
``python kill_run.py CONFIG.json`` with KILL_* variables set (see killer_fs)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import killer_fs  # noqa: E402,F401  (registers killer://)
from distributed import LocalCluster  # noqa: E402

from prefect_influence.config import PipelineConfig  # noqa: E402
from prefect_influence.flows import influence_pipeline  # noqa: E402

if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        data["dask_address"] = cluster.scheduler_address
        print(json.dumps(influence_pipeline(PipelineConfig.model_validate(data))))
