"""Tidegate: a Kubernetes egress gateway that allows destinations by domain name.

The two halves live in the repository's top-level ``gateway/`` (data plane) and
``operator/`` (control plane) folders and are imported as ``tidegate.gateway`` and
``tidegate.operator``, so nothing ever shadows the standard library's ``operator``.
(``operator/`` deliberately has no ``__init__.py``: a namespace portion never wins over
a real module of the same top-level name, even when the repo root is on ``sys.path``.)
"""

from importlib.metadata import PackageNotFoundError, version


def _installed_version() -> str:
    """The version pip recorded for the installed distribution (pyproject.toml is the one
    place a release bumps it); ``0+unknown`` when running from a tree that was never
    installed, so nothing ever reports a stale hard-coded number."""
    try:
        return version("tidegate")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _installed_version()
