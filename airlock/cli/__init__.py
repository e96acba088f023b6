"""The ``airlock`` command: ``main`` in :mod:`airlock.cli.main`, one module per group of actions."""
