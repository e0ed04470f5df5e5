"""The PyTorch library both sides run: the built-in networks, their preprocessing and weights files, data
loading and batching, the feature cache, transfer methods, metrics, evaluation, transferability scores
and the training state. The API serves and ranks models with it; the workers' recipes train with it."""
