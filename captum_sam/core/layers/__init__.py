"""Fast per-layer products: one module per layer type behind one interface."""
