"""Training phase: task batch sampler, Matryoshka InfoNCE, trainer and evaluation."""
