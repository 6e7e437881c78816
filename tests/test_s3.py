"""The pipeline against a real S3 endpoint on loopback (moto server): inputs and outputs on
``s3://``, results equal to a local run, credentials never stored or logged."""

from __future__ import annotations

import json
import logging

import numpy as np
import s3fs
import zarr
from jobs import job_config, read_outputs, write_inputs
from test_stages import run_tasks

from prefect_influence.storage import InfluenceStore


def _upload_inputs(local: dict, options: dict, prefix: str) -> dict:
    fs = s3fs.S3FileSystem(**options)
    remote = {}
    for name in ("train", "test"):
        src = zarr.open_group(local[name], mode="r")
        dst = zarr.open_group(
            f"s3://influence/{prefix}/{name}.zarr", mode="w", storage_options=options
        )
        for key in ("x", "y"):
            dst.create_array(key, data=np.asarray(src[key][...]))
        remote[name] = f"s3://influence/{prefix}/{name}.zarr"
    fs.put_file(local["checkpoint"], f"influence/{prefix}/model.pt")
    remote["checkpoint"] = f"s3://influence/{prefix}/model.pt"
    return remote


def test_pipeline_on_s3_equals_local_run(s3_server, tmp_path, caplog):
    _, options = s3_server
    local_inputs = write_inputs(tmp_path / "inputs")
    local = job_config(local_inputs, str(tmp_path / "local-out"))
    run_tasks(local)
    expected = read_outputs(local.output)

    remote_inputs = _upload_inputs(local_inputs, options, "job1")
    config = job_config(remote_inputs, "s3://influence/job1/out", storage_options=options)
    with caplog.at_level(logging.DEBUG, logger="prefect_influence"), caplog.at_level(logging.INFO):
        counts = run_tasks(config)
    assert counts == {"computed": 12, "reused": 0}
    got = read_outputs(config.output, options)
    for name, values in expected.items():
        assert np.array_equal(got[name], values, equal_nan=True), name
    # resume on S3 reuses everything
    assert run_tasks(config) == {"computed": 0, "reused": 12}

    store = InfluenceStore(config.output, options)
    manifest = json.dumps(store.read_manifest().to_json())
    for secret in (options["key"], options["secret"]):
        assert secret not in manifest
        assert secret not in caplog.text  # our logs and INFO+ of every library
    assert store.read_manifest().config["storage_options"]["secret"] == "***"


def test_credentials_from_the_environment(s3_server, tmp_path, monkeypatch):
    """Only the endpoint in the configuration; key and secret from AWS_* variables (s3fs)."""
    _, options = s3_server
    local_inputs = write_inputs(tmp_path / "inputs")
    remote_inputs = _upload_inputs(local_inputs, options, "job2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    endpoint_only = {"endpoint_url": options["endpoint_url"]}
    config = job_config(remote_inputs, "s3://influence/job2/out", storage_options=endpoint_only)
    assert run_tasks(config) == {"computed": 12, "reused": 0}
    manifest = json.dumps(InfluenceStore(config.output, endpoint_only).read_manifest().to_json())
    assert options["secret"] not in manifest and options["key"] not in manifest
