"""Integrations with training frameworks; ``fastdpo.integrations.trl`` holds ``FastDPOTrainer`` (TRL 1.16)."""
