"""Serve the influence deployments from one process (``prefect-influence serve``), as described
in ``deployments/prefect.yaml`` — the one place that defines them (top layer, like the CLI).

``prefect deploy --all --prefect-file deployments/prefect.yaml`` registers the deployments for
workers of a ``process`` work pool; :func:`serve_deployments` registers the same deployments
(names, descriptions, tags, schedules, parameters, parameter-schema enforcement) and runs their
flow runs in this process's children instead, without a work pool or worker::

    from prefect_influence.serving import serve_deployments

    serve_deployments()  # blocks; Ctrl+C stops serving and pauses the schedules
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "PREFECT_FILE",
    "load_deployment_specs",
    "flow_of",
    "deployment_env",
    "build_deployments",
    "serve_deployments",
]

#: deployments/prefect.yaml of the checkout this package runs from
PREFECT_FILE = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"

#: prefect.yaml keys of a deployment that serving understands: translated, or meaningful to
#: workers only (``entrypoint``, ``work_pool``). Anything else is refused, so an edit that serving
#: would silently ignore cannot make the two ways of deploying diverge.
_KNOWN_KEYS = {
    "name",
    "description",
    "entrypoint",
    "tags",
    "enforce_parameter_schema",
    "parameters",
    "schedules",
    "work_pool",
    "version",
    "paused",
}


def default_prefect_file() -> Path:
    """:data:`PREFECT_FILE` of the checkout this package runs from (an editable install), else
    ``deployments/prefect.yaml`` under the working directory (a package installed from a wheel
    does not contain the repository's deployments/)."""
    if PREFECT_FILE.is_file():
        return PREFECT_FILE
    return Path.cwd() / "deployments" / "prefect.yaml"


def load_deployment_specs(prefect_file: Union[str, Path, None] = None) -> list[dict[str, Any]]:
    """The ``deployments`` entries of ``prefect_file`` (default: :func:`default_prefect_file`)."""
    import yaml

    path = Path(prefect_file) if prefect_file else default_prefect_file()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: serving reads the deployments from the repository's "
            "deployments/prefect.yaml; run from a checkout or pass its path "
            "(prefect-influence serve --prefect-file PATH)."
        )
    data = yaml.safe_load(path.read_text()) or {}
    specs = data.get("deployments") or []
    if not specs:
        raise ValueError(f"{path} defines no deployments.")
    for spec in specs:
        unknown = sorted(set(spec) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(
                f"{path}: deployment {spec.get('name')!r} uses {', '.join(unknown)}, which "
                "prefect_influence.serving does not translate; extend serving.py or remove them."
            )
    return specs


def deployment_env(prefect_file: Union[str, Path, None] = None) -> dict[str, str]:
    """The environment the deployments' job variables give their runs (``work_pool:
    job_variables: env``), merged over every deployment (the first one's value wins): what
    a worker sets for each run, and ``serve`` for its own process and so for its runs."""
    env: dict[str, str] = {}
    for spec in load_deployment_specs(prefect_file):
        variables = (spec.get("work_pool") or {}).get("job_variables") or {}
        for key, value in (variables.get("env") or {}).items():
            env.setdefault(str(key), str(value))
    return env


def _schedule(item: dict[str, Any]):
    from prefect.schedules import Cron, Interval, RRule

    common = {
        "timezone": item.get("timezone"),
        "active": item.get("active", True),
        "parameters": item.get("parameters") or None,
        "slug": item.get("slug"),
    }
    if "cron" in item:
        return Cron(item["cron"], day_or=item.get("day_or", True), **common)
    if "interval" in item:
        return Interval(item["interval"], **common)
    if "rrule" in item:
        return RRule(item["rrule"], **common)
    raise ValueError(f"schedule {item!r}: expected one of cron, interval, rrule")


def flow_of(entrypoint: str):
    """The flow a ``flows/<module>.py:<function>`` entrypoint names, imported from the
    installed package (``prefect_influence.flows.<module>``), so it runs from any directory."""
    import importlib

    path, _, name = entrypoint.partition(":")
    folder, _, file = path.rpartition("/")
    if folder != "flows" or not file.endswith(".py") or not name:
        raise ValueError(
            f"entrypoint {entrypoint!r}: serving runs flows of this package, "
            "'flows/<module>.py:<function>'"
        )
    module = importlib.import_module(f"prefect_influence.flows.{file[:-3]}")
    return getattr(module, name)


def build_deployments(prefect_file: Union[str, Path, None] = None) -> list:
    """One :class:`~prefect.deployments.runner.RunnerDeployment` per entry of
    ``prefect_file``, its flow found by module path so it runs from any working directory."""
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for spec in load_deployment_specs(prefect_file):
        deployments.append(
            flow_of(spec["entrypoint"]).to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags") or [],
                version=spec.get("version"),
                paused=spec.get("paused"),
                parameters=spec.get("parameters") or {},
                schedules=[_schedule(item) for item in spec.get("schedules") or []],
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def serve_deployments(
    prefect_file: Union[str, Path, None] = None, limit: Optional[int] = None
) -> None:
    """Register and serve every deployment of ``prefect_file`` until interrupted; ``limit``
    caps the flow runs executing at once (default: no cap)."""
    from prefect import serve

    serve(*build_deployments(prefect_file), limit=limit)
