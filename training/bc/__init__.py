"""Behaviour cloning of the base manipulation policy (the stand-in for the VLA HELM wraps).

  demos.py    scripted-expert demonstrations with injected noise (DART), sharded on disk
  dataset.py  shards -> features and encoded action chunks; the split by episode
  model.py    observation features, action codec, the network and its checkpoint files
  train.py    the training loop, and the per-subgoal / long-horizon held-out evaluation
The runtime policy that loads a trained checkpoint is `policies.bc.BCPolicy`.
"""
