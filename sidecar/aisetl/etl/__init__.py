"""ETL: reconcile declarations into transformers, communicators, offline jobs."""
