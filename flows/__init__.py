"""Prefect flows composing the influence tasks (importable as ``prefect_influence.flows``)."""
