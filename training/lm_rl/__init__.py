"""Language-model RL: verifiable task substrate, reward functions and GRPO-family training."""
