"""``fastdpo plan``: the memory one training step needs, from running that step on the meta device."""
