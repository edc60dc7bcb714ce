"""The error a bad configuration raises, at load time, naming the key, file or value at fault.

Its own module so that every layer can raise it (config loading, the load-time checks, the
layout, the sweep plan, the task readers of evaluation/) without importing the others: imports run
one way (tests/test_imports.py draws them).
"""


class ConfigError(ValueError):
    """One line naming the config key, file or value at fault; the Snakefile shows it as
    `Invalid configuration: ...` before any job runs."""
