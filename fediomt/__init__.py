"""FedIoMT: federated learning for the Internet of Medical Things (device -> edge -> cloud -> device)."""

from protocol import __version__

__all__ = ["__version__"]
