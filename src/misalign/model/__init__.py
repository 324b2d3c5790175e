"""The model: prompts, agents' affine maps, the play, the theory, the observed play."""
