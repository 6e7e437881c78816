"""The influence query flow: a few new test points against a stored job's training set, with
its fitted influence model and stored train features, in one task (no Dask cluster: a query
is one pass of matrix products, or of gradients, in this process). The stored grid is not
touched; the result is the flow's return value and a table artifact, and for image inputs a
picture of the first points with their most helpful and most harmful training points.

Deployments load this file by path (``flows/influence_query.py:influence_query``), so its
imports are absolute.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from prefect_influence.config import QuerySpec
from prefect_influence.tasks import query_influences
from prefect_influence.user_errors import explain

__all__ = ["influence_query"]


@flow(name="influence-query", log_prints=False)
def influence_query(query: QuerySpec = QuerySpec()) -> dict[str, Any]:  # noqa: B008 (the form's defaults)
    """The ``query.top_k`` most helpful and most harmful training points of every point at
    ``query.test``, for the job stored at ``query.output``."""
    logger = get_run_logger()
    logger.info("query: %s", json.dumps(query.model_dump(mode="json", exclude={"storage_options"})))
    try:
        result = query_influences(query)
        out = result.to_json()
        if query.rows_output:
            _write_rows(query, result.rows)
            out["rows_output"] = query.rows_output
        _publish(query, result)
    except Exception as exc:
        told = explain(exc, started=True)
        for line in told.lines() if told else ():
            logger.error(line)
        raise
    logger.info("done: %s", json.dumps(out))
    return out


def _write_rows(query: QuerySpec, rows) -> None:
    import fsspec
    import numpy as np

    from prefect_influence.storage import storage_options

    buffer = io.BytesIO()
    np.save(buffer, rows)
    with fsspec.open(query.rows_output, "wb", **storage_options(query)) as f:
        f.write(buffer.getvalue())


def _publish(query: QuerySpec, result) -> None:
    create_table_artifact(
        result.table(),
        key="influence-query",
        description=f"Top {result.k} training points of {len(result.arrays['top_helpful'])} "
        f"query point(s) ({result.features})",
    )
    from prefect_influence.pipeline.query import draw_query

    picture = io.BytesIO()
    options = query.storage_options or None
    if draw_query(query.output, query.test, result, picture, options, query.storage_secret):
        encoded = base64.b64encode(picture.getvalue()).decode()
        create_markdown_artifact(
            key="influence-query-picture",
            markdown=f"# Query\n\n![query points and their training points](data:image/png;base64,{encoded})\n",
            description="The first query points, their most helpful and most harmful training points",
        )
