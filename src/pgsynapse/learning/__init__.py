"""The learning loop: feedback -> training examples -> fine-tune -> gate -> backfill -> A/B -> promote/rollback."""
