"""HcNet: being written."""
