"""The learning loop: feedback -> training examples -> fine-tune -> gate -> backfill -> A/B -> promote/rollback."""

# why a retrain does not run: the CLI refuses to queue one, the retrain job is skipped (handlers/retrain.py)
NOTHING_TO_LEARN = ("no feedback to learn from: no feedback row marks an answer helpful (helpful = true, or a rating"
                    " of 4 or 5: docs/learning.md)")
