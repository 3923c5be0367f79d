"""Language models: resolution of the embedded models, SFT batches, DeepSpeed fine-tuning and evaluation."""
