"""The in-domain image-text encoder of the HELM harness: generated captions of simulator
renders (`captions`), frames from the demonstrations and held-out episodes (`dataset`),
contrastive training with open_clip's model and ClipLoss (`train`) and held-out retrieval
evaluation (`evaluate`). The encoder itself is loaded by `perception.encoder`."""
