"""Uses of the curvature for continual learning: EWC, damage between tasks, task comparison."""
