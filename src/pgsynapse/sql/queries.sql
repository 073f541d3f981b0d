-- Named queries of the job queue and the embed handler. Loaded by pgsynapse.queries.q(name).

-- name: claim_jobs
-- Claim up to %(limit)s due pending jobs of one kind; SKIP LOCKED keeps workers off each other's rows.
-- started_at is the claim's token: the writer completes only the claim it holds (lock_owned_jobs).
WITH due AS (
    SELECT id FROM pgsynapse.jobs
    WHERE status = 'pending' AND kind = %(kind)s AND run_after <= now() AND NOT solo
    ORDER BY run_after, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE pgsynapse.jobs j
SET status = 'running', attempts = j.attempts + 1, worker = %(worker)s, started_at = clock_timestamp(),
    lease_until = now() + make_interval(secs => %(lease)s)
FROM due
WHERE j.id = due.id
RETURNING j.id, j.kind, j.ref_id, j.payload, j.attempts, coalesce(j.queued_at, j.created_at) AS queued_at,
          j.started_at;

-- name: claim_solo_job
-- One due job that must run alone (its lease expired in a batch: see migration 0008), or nothing.
WITH due AS (
    SELECT id FROM pgsynapse.jobs
    WHERE status = 'pending' AND solo AND kind = %(kind)s AND run_after <= now()
    ORDER BY run_after, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE pgsynapse.jobs j
SET status = 'running', attempts = j.attempts + 1, worker = %(worker)s, started_at = clock_timestamp(),
    lease_until = now() + make_interval(secs => %(lease)s)
FROM due
WHERE j.id = due.id
RETURNING j.id, j.kind, j.ref_id, j.payload, j.attempts, coalesce(j.queued_at, j.created_at) AS queued_at,
          j.started_at;

-- name: renew_leases
-- Only the claims of batches still within their deadline: a hung batch's jobs run out of lease and come back.
UPDATE pgsynapse.jobs j SET lease_until = now() + make_interval(secs => %(lease)s)
FROM unnest(%(ids)s::bigint[], %(claims)s::timestamptz[]) AS c (id, started_at)
WHERE j.id = c.id AND j.started_at = c.started_at AND j.status = 'running' AND j.worker = %(worker)s;

-- name: bound_idle_in_transaction
-- The server ends this transaction (and its session) if the client stays silent in it this long (db.bounded_transaction).
SELECT set_config('idle_in_transaction_session_timeout', %(silent_ms)s, true);

-- name: bound_transaction
-- As bound_idle_in_transaction, and also once it has lasted %(total_ms)s in all (PostgreSQL 17+): a client silent
-- inside a statement's message, where no idle timeout is armed (db.bounded_transaction).
SELECT set_config('idle_in_transaction_session_timeout', %(silent_ms)s, true),
       set_config('transaction_timeout', %(total_ms)s, true);

-- name: lock_owned_jobs
-- The writer's guard: only the claims this worker still holds are completed. The claim's started_at tells a
-- late result of an expired claim from a new claim of the same job by the same worker.
SELECT j.id FROM pgsynapse.jobs j
JOIN unnest(%(ids)s::bigint[], %(claims)s::timestamptz[]) AS c (id, started_at)
  ON j.id = c.id AND j.started_at = c.started_at
WHERE j.status = 'running' AND j.worker = %(worker)s
FOR UPDATE OF j;

-- name: complete_jobs
-- reasons: NULL for a job whose result was written, else why it was done with nothing to write or nothing to
-- serve, such as an emptied body (migration 0023)
UPDATE pgsynapse.jobs j
SET status = 'done', finished_at = now(), lease_until = NULL, completions = completions + 1, last_error = NULL,
    skip_reason = d.reason
FROM unnest(%(ids)s::bigint[], %(reasons)s::text[]) AS d (id, reason)
WHERE j.id = d.id AND j.status = 'running' AND j.worker = %(worker)s;

-- name: retry_job
-- Back to pending after a delay, unless a newer pending job for the same row exists (then it is superseded).
UPDATE pgsynapse.jobs j
SET status = 'pending', run_after = now() + make_interval(secs => %(delay)s), lease_until = NULL,
    worker = NULL, last_error = %(error)s
WHERE j.id = %(id)s AND j.status = 'running' AND j.worker = %(worker)s
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs p
                  WHERE p.kind = j.kind AND p.ref_id = j.ref_id AND p.status = 'pending');

-- name: release_job
-- A stopping worker abandoned the job (a training run it did not wait for): pending again at once, its attempt not
-- charged, unless a newer pending job for the same row exists (then it is superseded).
UPDATE pgsynapse.jobs j
SET status = 'pending', run_after = now(), lease_until = NULL, worker = NULL, attempts = greatest(j.attempts - 1, 0)
WHERE j.id = %(id)s AND j.status = 'running' AND j.worker = %(worker)s
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs p
                  WHERE p.kind = j.kind AND p.ref_id = j.ref_id AND p.status = 'pending');

-- name: supersede_job
-- done with nothing written, and why (skip_reason, as other jobs done with nothing to write): not an error
UPDATE pgsynapse.jobs
SET status = 'done', finished_at = now(), lease_until = NULL, last_error = NULL, skip_reason = %(reason)s
WHERE id = %(id)s AND status = 'running' AND worker = %(worker)s;

-- name: close_job_of_removed_row
-- A job that fails for good after its row was deleted or truncated while it ran: done, as the DELETE and TRUNCATE
-- triggers close the failed jobs of the rows they remove (triggers/deleted_rows_v1.sql, truncated_rows_v1.sql), not
-- failed for a row that is no more (job_row_removed_v1, migration 0046: never a bulk load's job, ref_ids). Nothing
-- when the row is there.
UPDATE pgsynapse.jobs j
SET status = 'done', finished_at = now(), lease_until = NULL, skip_reason = 'its row was deleted'
WHERE j.id = %(id)s AND j.status = 'running' AND j.worker = %(worker)s
  AND pgsynapse.job_row_removed_v1(j.kind, j.ref_id, j.ref_ids);

-- name: fail_job
UPDATE pgsynapse.jobs
SET status = 'failed', finished_at = now(), lease_until = NULL, last_error = %(error)s
WHERE id = %(id)s AND status = 'running' AND worker = %(worker)s
RETURNING kind, ref_id;

-- name: reap_expired_leases
-- Jobs whose worker vanished or hung: back to the queue, or failed once they have used every attempt.
-- Crash isolation (migration 0008): a job of a kind in %(isolate_kinds)s that expired in a batch is refunded the
-- attempt (any job of the batch may have killed the worker) and comes back solo; an expiry while solo is its own.
-- Per row (kind, ref_id) at most one job goes back to pending, the newest, and none when one is pending already
-- (jobs_pending_dedup) or a newer one runs or is done: the others are superseded, since every job of a row does
-- the same work on its latest state (requeued, it would write the same result a second time). A job out of
-- attempts is superseded alike: the row was edited after its claim, the newer job has the new text, and failing
-- the row would put the old text's failure over the new text's result. A job out of attempts whose row was deleted
-- or truncated meanwhile (job_row_removed_v1, migration 0046) is closed as done (skip_reason 'its row was
-- deleted'), as close_job_of_removed_row closes one that fails for good in its worker, not failed for a row that is
-- no more. The requeued jobs are returned: the caller withdraws what they wrote to their rows (an answer's partial
-- text: handlers' record_retry), in row id order as the failed ones (the order the writers lock rows in: handlers'
-- lock_rows).
WITH expired AS (
    SELECT id, kind, ref_id, worker, kind = ANY(%(isolate_kinds)s) AS isolate,
           attempts - (kind = ANY(%(isolate_kinds)s) AND NOT solo)::int AS charged,
           pgsynapse.job_row_removed_v1(kind, ref_id, ref_ids) AS removed
    FROM pgsynapse.jobs
    WHERE status = 'running' AND lease_until < now()
    FOR UPDATE SKIP LOCKED
), judged AS (
    SELECT e.*,
           row_number() OVER (PARTITION BY e.kind, e.ref_id ORDER BY e.id DESC) > 1
           -- a pending job, or a newer one running or done, reads (or has read) the row's latest state
           OR EXISTS (SELECT 1 FROM pgsynapse.jobs p
                      WHERE p.kind = e.kind AND p.ref_id = e.ref_id
                        AND (p.status = 'pending' OR (p.id > e.id AND p.status IN ('running', 'done')))) AS outdated,
           format('lease expired %%s times: the worker (last %%s) died or hung while processing this job',
                  e.charged, e.worker) AS lease_error
    FROM expired e
), failed AS (
    UPDATE pgsynapse.jobs j
    SET status = 'failed', finished_at = now(), lease_until = NULL, attempts = e.charged, last_error = e.lease_error
    FROM judged e
    WHERE j.id = e.id AND e.charged >= %(max_attempts)s AND NOT e.outdated AND NOT e.removed
    RETURNING j.id, j.kind, j.ref_id, j.last_error
), removed AS (
    UPDATE pgsynapse.jobs j
    SET status = 'done', finished_at = now(), lease_until = NULL, attempts = e.charged, last_error = NULL,
        skip_reason = 'its row was deleted'
    FROM judged e
    WHERE j.id = e.id AND e.charged >= %(max_attempts)s AND NOT e.outdated AND e.removed
    RETURNING j.id, j.kind, j.ref_id, e.lease_error AS error
), superseded AS (
    UPDATE pgsynapse.jobs j
    SET status = 'done', finished_at = now(), lease_until = NULL, last_error = NULL,
        skip_reason = CASE WHEN s.charged >= %(max_attempts)s
            THEN format('superseded by a newer job after its lease expired %%s times (worker %%s)', s.charged, s.worker)
            ELSE 'superseded by a newer job' END
    FROM judged s
    WHERE j.id = s.id AND s.outdated
    RETURNING j.id, j.kind
), requeued AS (
    UPDATE pgsynapse.jobs j
    SET status = 'pending', run_after = now(), lease_until = NULL, worker = NULL, attempts = s.charged,
        solo = j.solo OR s.isolate,
        last_error = format('lease expired (worker %%s)', s.worker)
    FROM judged s
    WHERE j.id = s.id AND s.charged < %(max_attempts)s AND NOT s.outdated
    RETURNING j.id, j.kind, j.ref_id, j.last_error
)
SELECT (SELECT count(*) FROM requeued) AS requeued,
       (SELECT coalesce(json_agg(requeued ORDER BY requeued.ref_id), '[]') FROM requeued) AS requeued_jobs,
       (SELECT coalesce(json_agg(removed ORDER BY removed.id), '[]') FROM removed) AS removed,
       (SELECT coalesce(json_object_agg(kind, n), '{}') FROM (SELECT kind, count(*) AS n FROM requeued GROUP BY kind) k)
           AS requeued_kinds,
       (SELECT count(*) FROM superseded) AS superseded,
       (SELECT coalesce(json_object_agg(kind, n), '{}') FROM (SELECT kind, count(*) AS n FROM superseded GROUP BY kind) k)
           AS superseded_kinds,
       (SELECT coalesce(json_agg(failed ORDER BY failed.ref_id), '[]') FROM failed) AS failed;

-- name: queue_stats
SELECT kind,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'done') AS done,
       extract(epoch FROM now() - min(coalesce(queued_at, created_at)) FILTER (WHERE status = 'pending'))
           AS oldest_pending_seconds
FROM pgsynapse.jobs
GROUP BY kind
ORDER BY kind;

-- name: serving_versions
-- Versions whose embeddings must exist for every chunk: the active one and candidates in rollout.
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent, passage_version_id, runtime_pending
FROM pgsynapse.model_versions
WHERE status IN ('active', 'candidate')
ORDER BY id;

-- name: passage_versions
-- The versions whose models encode the chunks of the serving query encoders (migration 0014), whatever their
-- status: a retired base version still encodes new documents for the query encoders trained on it.
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent, passage_version_id
FROM pgsynapse.model_versions
WHERE id IN (SELECT passage_version_id FROM pgsynapse.model_versions
             WHERE status IN ('active', 'candidate') AND passage_version_id IS NOT NULL)
ORDER BY id;

-- name: active_version
SELECT id, name, artifact_path, runtime, dim, status, traffic_percent, passage_version_id
FROM pgsynapse.model_versions WHERE status = 'active';

-- name: load_documents
-- The lengths first: a row over max_title_chars or max_document_chars comes without its title and body (NULL),
-- so the text of an oversized row is never fetched; it fails from its lengths alone.
-- already_embedded: an earlier job, claimed before the last edit and loaded after it, embedded this content.
SELECT id, content_hash, title_chars, body_chars, already_embedded,
       CASE WHEN fits THEN title END AS title, CASE WHEN fits THEN body END AS body, fits
FROM (SELECT id, content_hash, title, body, length(title) AS title_chars, length(body) AS body_chars,
             status = 'embedded' AND embedded_hash = content_hash AS already_embedded
      FROM pgsynapse.documents WHERE id = ANY(%(ids)s)) d,
     LATERAL (SELECT coalesce(title_chars, 0) <= %(max_title_chars)s
                     AND coalesce(body_chars, 0) <= %(max_document_chars)s AS fits) f;

-- name: lock_documents
-- already_embedded: another job wrote this very content (it was claimed before an edit and loaded after it)
SELECT id, content_hash, status = 'embedded' AND embedded_hash = content_hash AS already_embedded
FROM pgsynapse.documents WHERE id = ANY(%(ids)s) FOR UPDATE;

-- name: stored_chunks
-- The passages the documents have now, to keep the id of each one cut again unchanged (its text's md5, its place).
SELECT id, document_id, ord, md5(text) AS text_md5, char_start, char_end
FROM pgsynapse.chunks WHERE document_id = ANY(%(ids)s);

-- name: delete_chunks
-- The documents' passages but those kept (%(keep)s): answers, feedback and training examples name a chunk by its id,
-- and a deleted one is lost to them (ON DELETE SET NULL).
DELETE FROM pgsynapse.chunks WHERE document_id = ANY(%(ids)s) AND id <> ALL(%(keep)s::bigint[]);

-- name: delete_kept_embeddings
-- The vectors of the kept passages: each is embedded again (with its title, which may have changed).
DELETE FROM pgsynapse.embeddings WHERE chunk_id = ANY(%(keep)s::bigint[]);

-- name: next_chunk_ids
SELECT nextval('pgsynapse.chunks_id_seq') AS id FROM generate_series(1, %(n)s);

-- name: insert_chunks
-- The write transaction sends each statement whole, never COPY FROM STDIN or a pipeline (psycopg's executemany):
-- the server must wait on the worker only at a ReadyForQuery, where idle_in_transaction_session_timeout ends the
-- transaction of a worker cut off from it (db.bounded_transaction). Inside a COPY it would wait with the jobs'
-- row locks held until its TCP keepalive gave up, and no other worker could take them over
-- (tests/chaos/test_chaos_partition.py).
-- A kept passage (delete_chunks) is its row again: its token count and content hash follow the document's.
INSERT INTO pgsynapse.chunks (id, document_id, ord, text, token_count, char_start, char_end, content_hash)
SELECT * FROM unnest(%(ids)b::bigint[], %(documents)b::bigint[], %(ords)b::int[], %(texts)b::text[],
                     %(tokens)b::int[], %(starts)b::int[], %(ends)b::int[], %(hashes)b::text[])
ON CONFLICT (id) DO UPDATE SET token_count = excluded.token_count, content_hash = excluded.content_hash;

-- name: insert_embeddings
-- One statement (see insert_chunks), its arrays bound in binary.
INSERT INTO pgsynapse.embeddings (chunk_id, model_version_id, embedding)
SELECT * FROM unnest(%(chunks)b::bigint[], %(versions)b::int[], %(embeddings)b::vector[]);

-- name: mark_documents_embedded
UPDATE pgsynapse.documents d
SET status = 'embedded', error = NULL, embedded_hash = d.content_hash, embedded_at = now()
WHERE d.id = ANY(%(ids)s);

-- name: mark_document_failed
-- A job's final failure, unless the document was edited since (a pending job has its new text): then the row
-- stays pending for that job, and nothing is announced.
UPDATE pgsynapse.documents d SET status = 'failed', error = %(error)s
WHERE d.id = %(id)s
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs p WHERE p.kind = 'embed' AND p.ref_id = d.id AND p.status = 'pending')
RETURNING d.id;

-- name: lock_document_rows
-- The rows a batch's write touches, locked before any other row lock, in one order (by id) in every worker: the
-- write and the failures then never lock them in opposite orders (listener/writer.py, Handler.lock_rows).
SELECT id FROM pgsynapse.documents WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE;

-- name: document_changed_since
-- Whether the document holds other content than a failed job read (%(hash)s): the failure is then the old text's.
-- FOR UPDATE: an edit not yet committed is waited for, and read once committed.
SELECT content_hash IS DISTINCT FROM %(hash)s AS changed FROM pgsynapse.documents WHERE id = %(id)s FOR UPDATE;

-- name: requeue_changed_documents
-- The documents of superseded jobs (handlers/base.py, requeue_changed) whose content is not embedded: a new job,
-- unless the row has a newer job (it reads the row after the edit: an edit waits for the row lock of the one before)
-- or a pending one.
INSERT INTO pgsynapse.jobs (kind, ref_id)
SELECT j.kind, j.ref_id FROM pgsynapse.jobs j JOIN pgsynapse.documents d ON d.id = j.ref_id
WHERE j.id = ANY(%(jobs)s) AND d.embedded_hash IS DISTINCT FROM d.content_hash
  AND NOT EXISTS (SELECT 1 FROM pgsynapse.jobs n WHERE n.kind = j.kind AND n.ref_id = j.ref_id AND n.id > j.id)
ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;

-- name: notify_documents
SELECT pg_notify('pgsynapse_documents', json_build_object('id', d, 'status', %(status)s::text)::text)
FROM unnest(%(ids)s::bigint[]) AS d;

-- name: search_chunks
SELECT c.id AS chunk_id, c.document_id, d.title, d.source, c.ord, c.text,
       1 - (e.embedding::vector({dim}) <=> %(query)s::vector({dim})) AS score
FROM pgsynapse.embeddings e
JOIN pgsynapse.chunks c ON c.id = e.chunk_id
JOIN pgsynapse.documents d ON d.id = c.document_id
WHERE e.model_version_id = %(version)s
ORDER BY e.embedding::vector({dim}) <=> %(query)s::vector({dim})
LIMIT %(k)s;

-- name: lock_live_versions
-- The model versions among %(ids)s that are not retired, locked until the caller's commit (a retire waits for it).
SELECT id FROM pgsynapse.model_versions WHERE id = ANY(%(ids)s) AND status <> 'retired' ORDER BY id FOR SHARE;

-- name: next_due
-- Seconds until the earliest pending job of a kind is due (retries wait for their backoff); NULL if none. And
-- whether the enqueue triggers send NOTIFYs (migration 0018): when they do not, an idle worker polls.
SELECT extract(epoch FROM min(run_after) - now()) AS seconds,
       coalesce((SELECT notify_on_enqueue FROM pgsynapse.queue_settings), true) AS notify
FROM pgsynapse.jobs WHERE status = 'pending' AND kind = %(kind)s;

-- name: enqueue_notify
SELECT notify_on_enqueue FROM pgsynapse.queue_settings;

-- name: set_enqueue_notify
UPDATE pgsynapse.queue_settings SET notify_on_enqueue = %(on)s RETURNING notify_on_enqueue;
-- name: expand_bulk_jobs
-- A bulk job (ref_ids, from a large INSERT) becomes one pending job per row, and is done, in one transaction.
WITH bulk AS (
    UPDATE pgsynapse.jobs
    SET status = 'done', finished_at = now(), lease_until = NULL, completions = completions + 1
    WHERE id = ANY(%(ids)s) AND status = 'running' AND worker = %(worker)s AND ref_ids IS NOT NULL
    RETURNING kind, ref_ids
)
INSERT INTO pgsynapse.jobs (kind, ref_id)
SELECT b.kind, u FROM bulk b, unnest(b.ref_ids) AS u
ON CONFLICT (kind, ref_id) WHERE status = 'pending' DO NOTHING;

-- name: lock_failed_jobs
-- retry-failed: the failed jobs to requeue (all kinds when %(kind)s is NULL), newest first per row.
-- superseded: the row has a pending job, or a newer job that is running or done (the row changed since);
-- gone: the job's row (a document, question, image or data question) was deleted (nothing left to do);
-- input_error: it failed on its input (handlers' `InputError: ...`, never retried): it fails again unless its row or
-- a limit changed
SELECT id, kind, ref_id, last_error, coalesce(last_error LIKE 'InputError%%', false) AS input_error,
       EXISTS (SELECT 1 FROM pgsynapse.jobs p WHERE p.kind = j.kind AND p.ref_id = j.ref_id
               AND (p.status = 'pending' OR (p.id > j.id AND p.status IN ('running', 'done')))) AS superseded,
       CASE kind
           WHEN 'embed' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.documents r WHERE r.id = j.ref_id)
           WHEN 'answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.questions r WHERE r.id = j.ref_id)
           WHEN 'embed_image' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.images r WHERE r.id = j.ref_id)
           WHEN 'sql_answer' THEN NOT EXISTS (SELECT 1 FROM pgsynapse.data_questions r WHERE r.id = j.ref_id)
           ELSE false
       END AS gone
FROM pgsynapse.jobs j
WHERE status = 'failed' AND (%(kind)s::text IS NULL OR kind = %(kind)s)
ORDER BY kind, ref_id, id DESC
FOR UPDATE;

-- name: requeue_failed_jobs
-- Back to pending with a fresh set of attempts, due now, queued now (the queue's age and the result's latency count
-- from here: migration 0027); the last error is kept for the record.
UPDATE pgsynapse.jobs
SET status = 'pending', attempts = 0, solo = false, run_after = now(), queued_at = now(), lease_until = NULL,
    worker = NULL, finished_at = NULL,
    last_error = 'requeued by retry-failed after: ' || coalesce(last_error, 'unknown error')
WHERE id = ANY(%(ids)s) AND status = 'failed';

-- name: close_failed_duplicates
-- Older failed jobs of a row that is requeued (or already has a pending job): nothing left for them to do.
UPDATE pgsynapse.jobs
SET status = 'done', finished_at = now(), skip_reason = 'superseded by a newer job (retry-failed)'
WHERE id = ANY(%(ids)s) AND status = 'failed';

-- name: close_failed_of_deleted_rows
-- Failed jobs whose row was deleted: closed, not requeued (a requeued one would only find its row gone).
UPDATE pgsynapse.jobs
SET status = 'done', finished_at = now(), skip_reason = 'its row was deleted (retry-failed)'
WHERE id = ANY(%(ids)s) AND status = 'failed';

-- name: retry_failed_images
UPDATE pgsynapse.images SET status = 'pending', error = NULL WHERE id = ANY(%(ids)s) AND status = 'failed';

-- name: retry_failed_data_questions
UPDATE pgsynapse.data_questions SET status = 'pending', error = NULL, answered_at = NULL, latency_ms = NULL,
    asked_at = now()
WHERE id = ANY(%(ids)s) AND status = 'failed';

-- name: retry_failed_documents
-- The rows of requeued embed jobs go back to pending, their error cleared.
UPDATE pgsynapse.documents SET status = 'pending', error = NULL
WHERE id = ANY(%(ids)s) AND status = 'failed';

-- name: retry_failed_questions
-- The questions of requeued answer jobs go back to pending, their error cleared, asked again now (their latency
-- counts from here, not from the first ask: migration 0024).
UPDATE pgsynapse.questions SET status = 'pending', error = NULL, answered_at = NULL, latency_ms = NULL, asked_at = now()
WHERE id = ANY(%(ids)s) AND status = 'failed';

-- name: notify_jobs
SELECT pg_notify('pgsynapse_jobs', json_build_object('kind', %(kind)s::text, 'n', %(n)s::int)::text);

-- name: worker_heartbeat
-- A worker's registration, refreshed from its maintenance loop (status shows it; a clean stop deletes it).
INSERT INTO pgsynapse.workers (worker_id, host, pid, kinds, models, rss_mb, processed)
VALUES (%(worker)s, %(host)s, %(pid)s, %(kinds)s, %(models)s, %(rss_mb)s, %(processed)s)
ON CONFLICT (worker_id) DO UPDATE
SET models = excluded.models, rss_mb = excluded.rss_mb, processed = excluded.processed, heartbeat_at = now();

-- name: worker_deregister
DELETE FROM pgsynapse.workers WHERE worker_id = %(worker)s;

-- name: workers_prune
-- Registrations of workers killed without a clean stop, unseen for a day.
DELETE FROM pgsynapse.workers WHERE heartbeat_at < now() - interval '1 day';

-- name: hold_worker_presence
-- A worker's LISTEN connection holds this session lock while it is open (key 1885828983 = "pgsw", and the worker
-- id's hash), so status sees a worker whose connection closed (a SIGKILL: the server reads the closed socket at
-- once) as gone at once, not only once its heartbeat is 120 s old. A try: nobody else ever takes a worker's key.
SELECT pg_try_advisory_lock(1885828983, hashtext(%(worker)s)) AS held;

-- name: session_backend_pid
-- The server process this statement ran on. A pooler between the client and PostgreSQL (PgBouncer, in any mode)
-- hands the client a backend pid of its own making, so this differs from the pid the client was given at login.
SELECT pg_backend_pid() AS pid;

-- name: workers_seen
-- connected: the worker's LISTEN connection holds its presence lock (hold_worker_presence).
SELECT worker_id, host, pid, kinds, models, rss_mb, processed, started_at,
       round(extract(epoch FROM now() - heartbeat_at)::numeric, 1)::float AS last_seen_seconds,
       EXISTS (SELECT FROM pg_catalog.pg_locks l
               WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 1885828983::oid
                 AND l.objid = hashtext(w.worker_id)::oid AND l.objsubid = 2
                 AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))
           AS connected
FROM pgsynapse.workers w ORDER BY started_at;

-- name: prune_done_jobs
-- the oldest done jobs past retention, a bounded batch per call (short locks; the next call takes the rest)
WITH old AS (
    SELECT id FROM pgsynapse.jobs
    WHERE status = 'done' AND finished_at < now() - make_interval(secs => %(retention)s)
    ORDER BY finished_at
    LIMIT %(limit)s
)
DELETE FROM pgsynapse.jobs j USING old WHERE j.id = old.id

-- name: log_inference
-- one row per model version that computed a batch (written in the batch's own write transaction)
INSERT INTO pgsynapse.inference_log (model_version_id, op, batch_size, latency_ms)
SELECT v, %(op)s, %(n)s, %(ms)s FROM unnest(%(versions)s::int[]) AS v

-- name: prune_inference_log
WITH old AS (
    SELECT id FROM pgsynapse.inference_log
    WHERE at < now() - make_interval(secs => %(retention)s)
    ORDER BY at
    LIMIT %(limit)s
)
DELETE FROM pgsynapse.inference_log l USING old WHERE l.id = old.id

-- name: lock_wait_slice
-- a lock wait of at most %(ms)s ms in this transaction (db.take_xact_lock waits in such slices)
SELECT set_config('lock_timeout', %(ms)s::text, true);

-- name: lock_timeout_now
-- the lock_timeout of this transaction, for db.take_xact_lock to restore after its slices
SELECT current_setting('lock_timeout');

-- name: lock_timeout_restore
SELECT set_config('lock_timeout', %(value)s, true);
