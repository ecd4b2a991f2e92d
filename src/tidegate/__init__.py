"""Tidegate: a Kubernetes egress gateway that allows destinations by domain name.

The two halves live in the repository's top-level ``gateway/`` (data plane) and
``operator/`` (control plane) folders and are imported as ``tidegate.gateway`` and
``tidegate.operator``, so nothing ever shadows the standard library's ``operator``.
(``operator/`` deliberately has no ``__init__.py``: a namespace portion never wins over
a real module of the same top-level name, even when the repo root is on ``sys.path``.)
"""

__version__ = "0.1.0"
