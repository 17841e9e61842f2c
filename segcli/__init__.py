"""segcli: semantic segmentation for PyTorch behind one command, `seg`."""

__version__ = "0.1.0"
