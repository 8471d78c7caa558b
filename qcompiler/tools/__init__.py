"""Tooling, off the library's import path: the CLI, model and text fetching (``models``, ``texts``,
``pypi``), evaluation and the benchmark helpers. Nothing in the library imports it."""
