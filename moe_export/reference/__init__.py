"""The faithful PyTorch forward (the parity oracle): routing, per-unit modules, and `load`."""
