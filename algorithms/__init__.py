"""Pure PyTorch math of distill-orchestrator: networks, augmentation, expert training,
distillers and evaluation. Nothing in this package imports ray, mlflow or a file format."""
