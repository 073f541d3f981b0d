"""The chaos invariants can fail: each duplicate a scenario must never produce is made here by hand and counted."""

from __future__ import annotations

import psycopg

from tests.chaos.invariants import check
from tests.helpers import insert_docs


def test_a_row_written_twice_is_counted_per_row(db_url):
    [doc] = insert_docs(db_url, [("Twice", "A document whose job ran twice.")])
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE pgsynapse.jobs SET status = 'done', completions = 1 WHERE ref_id = %s", (doc,))
        h = conn.execute("SELECT content_hash FROM pgsynapse.documents WHERE id = %s", (doc,)).fetchone()[0]
        # the same set written, deleted and written again: what a second run of the same job does
        for _ in range(2):
            conn.execute("DELETE FROM pgsynapse.chunks WHERE document_id = %s", (doc,))
            chunk = conn.execute(
                "INSERT INTO pgsynapse.chunks (document_id, ord, text, token_count, char_start, char_end, content_hash)"
                " VALUES (%s, 0, 'A document whose job ran twice.', 8, 0, 30, %s) RETURNING id", (doc, h)).fetchone()[0]
            conn.execute("INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding)"
                         " VALUES (%s, 1, array_fill(0.1, ARRAY[384])::vector)", (chunk,))
        conn.execute("UPDATE pgsynapse.documents SET status = 'embedded', embedded_hash = content_hash WHERE id = %s", (doc,))
        q = conn.execute("INSERT INTO pgsynapse.questions (text) VALUES ('asked once') RETURNING id").fetchone()[0]
        for _ in range(2):
            conn.execute("UPDATE pgsynapse.questions SET status = 'answered', answer = 'a', answered_at = clock_timestamp()"
                         " WHERE id = %s", (q,))
    result = check(db_url)
    v = result["violations"]
    assert (v["chunks_written_twice"], v["embeddings_written_twice"], v["answers_written_twice"]) == (1, 0, 1)
    assert result["duplicated"] == 2


def test_image_invariants_count_lost_and_duplicated_images(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        model = conn.execute("INSERT INTO pgsynapse.image_models (name, kind, artifact_path, dim, status)"
                             " VALUES ('m', 'image', '/nowhere', 3, 'active') RETURNING id").fetchone()[0]
        twice, waiting, unjobbed = (conn.execute("INSERT INTO pgsynapse.images (data) VALUES (%s) RETURNING id",
                                                 (bytes([i]),)).fetchone()[0] for i in range(3))
        conn.execute("UPDATE pgsynapse.jobs SET status = 'done', completions = 1 WHERE ref_id = %s", (twice,))
        conn.execute("DELETE FROM pgsynapse.jobs WHERE ref_id = %s", (unjobbed,))
        for _ in range(2):  # what a second run of the same job does: delete the vector, write it again
            conn.execute("DELETE FROM pgsynapse.image_embeddings WHERE image_id = %s", (twice,))
            conn.execute("INSERT INTO pgsynapse.image_embeddings (image_id, model_id, embedding) VALUES (%s, %s, '[1,0,0]')",
                         (twice, model))
        conn.execute("UPDATE pgsynapse.images SET status = 'embedded', embedded_hash = content_hash WHERE id = ANY(%s)",
                     ([twice, unjobbed],))
    v = check(db_url)["violations"]
    assert (v["image_embeddings_written_twice"], v["images_not_current"], v["images_missing_embeddings"],
            v["images_embedded_without_a_job"]) == (1, 1, 1, 1), v
    assert waiting
