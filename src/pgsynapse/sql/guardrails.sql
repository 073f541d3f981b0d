-- `pgsynapse guardrail`: the rules a person manages (pgsynapse/guardrail_cli.py). The worker reads the enabled ones
-- with answers.sql's `guardrail_rules`.

-- name: all_rules
SELECT id, text, action, threshold, enabled, created_at FROM pgsynapse.guardrail_rules ORDER BY id;

-- name: add_rule
INSERT INTO pgsynapse.guardrail_rules (text, action, threshold) VALUES (%(text)s, %(action)s, %(threshold)s)
RETURNING id;

-- name: set_rule_enabled
UPDATE pgsynapse.guardrail_rules SET enabled = %(enabled)s WHERE id = %(id)s RETURNING id;

-- name: set_rule
-- A NULL leaves that column as it is.
UPDATE pgsynapse.guardrail_rules
SET action = coalesce(%(action)s, action), threshold = coalesce(%(threshold)s, threshold)
WHERE id = %(id)s RETURNING id, action, threshold;

-- name: remove_rule
DELETE FROM pgsynapse.guardrail_rules WHERE id = %(id)s RETURNING id;
