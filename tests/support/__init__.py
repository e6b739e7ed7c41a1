"""Test support shared by the test modules (not collected by pytest: no ``test_*`` files here).

Importable as ``tests.support``: pytest puts the repository root on ``sys.path`` (``pythonpath`` in
pyproject.toml's pytest settings).
"""
