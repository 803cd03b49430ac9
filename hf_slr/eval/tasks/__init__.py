"""lm-eval task configs (``slr_*.yaml``) that read the offline data; loaders in :mod:`.utils`."""
