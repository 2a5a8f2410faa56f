"""Shared fixtures: ``qframe_registry`` and ``tiny_llama`` come from :mod:`qframe.testing`."""

pytest_plugins = ["qframe.testing"]
