"""FedIoMT's shared foundation: wire protocol, codec, signing, MQTT and TLS setup, logs, config files.

`__version__` is the project's one version (pyproject.toml reads it; fediomt re-exports it): the lowest package
holds it so model bundles and caches can stamp it without importing the CLI.
"""

__version__ = "0.1.0"
