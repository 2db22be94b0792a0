"""Per-sample gradients: the vmap, capture and exact-loop engines, likelihoods, label sources, batches, checks, distributed reduction and checkpoints."""
