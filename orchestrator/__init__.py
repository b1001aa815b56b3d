"""Ray/PyTorch/MLflow dataset-distillation orchestrator."""
