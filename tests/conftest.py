"""Shared pytest configuration.

Fixture modules live beside the tests (``tests/`` is on ``pythonpath``) and are loaded
as plugins here so every test folder can use them.
"""

pytest_plugins = ["fixtures_net", "fixtures_kube"]
