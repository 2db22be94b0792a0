"""Uses of the curvature for pruning: importance, masks and their application through torch.nn.utils.prune."""
