"""Built-in architectures, their offline pretrained loaders, and the preprocessing they share between
training and serving. `catalog` and `spec` import no torch; the rest do."""
