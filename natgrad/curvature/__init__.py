"""Curvatures built from exact per-sample gradients: the diagonal Fisher, Kronecker factors, the low-rank (Woodbury) form, estimation and tracking."""
