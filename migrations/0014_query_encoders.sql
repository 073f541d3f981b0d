-- pgsynapse 0014: a fine-tuned version may be a query encoder over another version's chunk vectors (issue 23).
-- The retrain job trains only the query side: its candidate encodes questions, and the chunks keep the vectors of
-- passage_version_id (the version whose model encoded them). Its backfill copies those vectors instead of
-- encoding the corpus again, and new documents are encoded once, by the passage version's model, for both.
-- NULL: the version encodes its chunks itself (the default model, an exported or an added model).

ALTER TABLE pgsynapse.model_versions
    ADD COLUMN IF NOT EXISTS passage_version_id int REFERENCES pgsynapse.model_versions (id);

COMMENT ON COLUMN pgsynapse.model_versions.passage_version_id IS
    'the version whose model encodes the chunks this version searches (NULL: its own model)';
