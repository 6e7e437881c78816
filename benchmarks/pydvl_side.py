"""pyDVL's half of ``vs_pydvl.py``: runs inside the isolated pyDVL virtualenv (numpy < 2), so it
imports only pyDVL, torch, numpy and dask, never ``prefect_influence``.

    benchmarks/.pydvl-venv/bin/python benchmarks/pydvl_side.py WORKDIR RUN

Reads ``WORKDIR/inputs.npz`` (data), ``WORKDIR/model.pt`` (trained state_dict) and
``WORKDIR/spec.json`` (architecture, λ, block grid, and the run ``RUN``: class, options and dtype),
fits pyDVL's model, times ``DaskInfluenceCalculator(...).influences(...).compute()`` on Dask's
synchronous scheduler, and writes ``WORKDIR/pydvl_RUN.npz`` (values) and
``WORKDIR/pydvl_RUN.json`` (timings, versions, warnings).
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
    return nn.Sequential(
        nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])
    ).eval()


def main() -> None:
    workdir, run = Path(sys.argv[1]), sys.argv[2]
    import dask
    import dask.array as da
    import numpy as np
    import pydvl
    import torch
    from pydvl.influence import DaskInfluenceCalculator, DisableClientSingleThreadCheck
    from pydvl.influence import torch as methods
    from pydvl.influence.torch.util import BlockMode, SecondOrderMode, TorchNumpyConverter
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    spec = json.loads((workdir / "spec.json").read_text())
    settings = spec["runs"][run]
    data = np.load(workdir / "inputs.npz")
    net = build_network(spec)
    net.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    float64 = settings.get("dtype") == "float64"
    arrays = {k: data[k].astype("float64") if float64 and k[0] == "x" else data[k] for k in data}
    net = net.double() if float64 else net
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    xt, yt = arrays["x_test"][: settings["n_test"]], arrays["y_test"][: settings["n_test"]]
    options = dict(settings.get("options", {}))
    if "block_structure" in options:
        options["block_structure"] = BlockMode(options["block_structure"])
    if "second_order_mode" in options:
        options["second_order_mode"] = SecondOrderMode(options["second_order_mode"])
    model = getattr(methods, settings["class"])(
        net, F.cross_entropy, regularization=spec["regularization"], **options
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=settings["fit_batch_size"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model.fit(loader)
        t_fit = time.perf_counter() - start
        blocks = settings["blocks"]
        train_chunk, test_chunk = -(-len(x) // blocks), -(-len(xt) // blocks)
        da_x = da.from_array(arrays["x_train"], chunks=(train_chunk, -1))
        da_y = da.from_array(arrays["y_train"], chunks=train_chunk)
        da_xt = da.from_array(xt, chunks=(test_chunk, -1))
        da_yt = da.from_array(yt, chunks=test_chunk)
        with dask.config.set(scheduler="synchronous"):
            calculator = DaskInfluenceCalculator(
                model, TorchNumpyConverter(), DisableClientSingleThreadCheck
            )
            start = time.perf_counter()
            values = calculator.influences(da_xt, da_yt, da_x, da_y).compute()
            t_compute = time.perf_counter() - start
    np.savez(workdir / f"pydvl_{run}.npz", values=np.asarray(values))
    report = {
        "pydvl": pydvl.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fit_s": t_fit,
        "influences_compute_s": t_compute,
        "warnings": sorted({str(w.message).splitlines()[0][:160] for w in caught}),
    }
    (workdir / f"pydvl_{run}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
