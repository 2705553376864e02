"""directfs: read a remote global namespace as if it were a local disk."""

__version__ = "0.1.0"
