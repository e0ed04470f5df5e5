"""Graft's core: what the API and the workers share, importing neither of them and no torch: settings,
the database and its tables, the jobs store, storage, dataset formats, the model catalog and specs,
default hyperparameters, the queue, and the transfer report's arithmetic."""
