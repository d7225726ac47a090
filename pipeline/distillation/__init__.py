"""Knowledge distillation: losses, checkpoints and the training loop of the distill stage."""
