"""Uses of the curvature for optimization: preconditioners, the natural-gradient optimizer and Fisher scaling."""
