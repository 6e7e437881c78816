"""pyDVL's half of ``vs_pydvl.py``: runs inside the isolated pyDVL virtualenv (numpy < 2), so it
imports only pyDVL, torch, numpy and dask, never ``prefect_influence``.

    benchmarks/.pydvl-venv/bin/python benchmarks/pydvl_side.py WORKDIR METHOD

Reads ``WORKDIR/inputs.npz`` (data), ``WORKDIR/model.pt`` (trained state_dict) and
``WORKDIR/spec.json`` (architecture, method settings, block grid, workers), fits pyDVL's model,
times ``DaskInfluenceCalculator.influences(...).compute()`` on a LocalCluster and writes
``WORKDIR/pydvl_METHOD.npz`` (values) and ``WORKDIR/pydvl_METHOD.json`` (timings, versions).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path


def build_network(spec):
    from torch import nn

    sizes = spec["layers"]
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).eval()


def main() -> None:
    workdir, method = Path(sys.argv[1]), sys.argv[2]
    import dask
    import dask.array as da
    import numpy as np
    import pydvl
    import torch
    from distributed import Client, LocalCluster
    from pydvl.influence import DaskInfluenceCalculator
    from pydvl.influence.torch import CgInfluence, DirectInfluence
    from pydvl.influence.torch.util import TorchNumpyConverter
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    spec = json.loads((workdir / "spec.json").read_text())
    data = np.load(workdir / "inputs.npz")
    net = build_network(spec)
    net.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    settings = spec["methods"][method]
    if method == "direct":
        model = DirectInfluence(net, F.cross_entropy, regularization=spec["regularization"])
    else:
        model = CgInfluence(net, F.cross_entropy, regularization=spec["regularization"],
                            rtol=settings["pydvl_rtol"], atol=settings["pydvl_atol"],
                            maxiter=settings["maxiter"], solve_simultaneously=True)
    loader = DataLoader(TensorDataset(x, y), batch_size=settings["pydvl_fit_batch_size"])
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(loader)
        t_fit = time.perf_counter() - start

        blocks = spec["blocks"]
        train_chunk = -(-len(x) // blocks)
        test_chunk = -(-len(data["x_test"]) // blocks)
        da_x = da.from_array(data["x_train"], chunks=(train_chunk, -1))
        da_y = da.from_array(data["y_train"], chunks=train_chunk)
        da_xt = da.from_array(data["x_test"], chunks=(test_chunk, -1))
        da_yt = da.from_array(data["y_test"], chunks=test_chunk)
        # the same worker environment on both sides (spec["dask_config"], see vs_pydvl.py)
        with dask.config.set(spec.get("dask_config", {})), LocalCluster(
            n_workers=spec["n_workers"], threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster, Client(cluster):
            start = time.perf_counter()
            calculator = DaskInfluenceCalculator(model, TorchNumpyConverter(), Client.current())
            t_scatter = time.perf_counter() - start
            # one untimed warm-up, then the best of spec["repeat"]: as on our side
            calculator.influences(da_xt, da_yt, da_x, da_y).compute()
            t_compute = float("inf")
            for _ in range(spec.get("repeat", 1)):
                start = time.perf_counter()
                values = calculator.influences(da_xt, da_yt, da_x, da_y).compute()
                t_compute = min(t_compute, time.perf_counter() - start)
    np.savez(workdir / f"pydvl_{method}.npz", values=np.asarray(values))
    report = {
        "pydvl": pydvl.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "fit_s": t_fit, "scatter_s": t_scatter, "influences_compute_s": t_compute,
        "warnings": sorted({str(w.message).splitlines()[0][:160] for w in caught}),
    }
    (workdir / f"pydvl_{method}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
