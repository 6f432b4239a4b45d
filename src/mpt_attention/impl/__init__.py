"""Backend implementations. Each one stands alone: none imports another."""
