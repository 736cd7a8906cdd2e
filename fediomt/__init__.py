"""FedIoMT: federated learning for the Internet of Medical Things (device -> edge -> cloud -> device)."""

__version__ = "0.1.0"
