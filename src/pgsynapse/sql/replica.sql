-- Reads on a streaming replica (pgsynapse.replica).

-- name: primary_flush_lsn
-- everything committed on the primary so far is at or before this point of its WAL
SELECT pg_current_wal_flush_lsn()::text AS lsn;

-- name: replica_caught_up
-- a replica has applied the primary's WAL up to %(lsn)s (false on a server that is not in recovery)
SELECT pg_is_in_recovery() AND coalesce(pg_last_wal_replay_lsn() >= %(lsn)s::pg_lsn, false) AS ok;

-- name: replica_lag
-- how far behind the primary's %(lsn)s the replica is, in bytes of WAL and in time since its last replayed commit
SELECT pg_is_in_recovery() AS in_recovery,
       pg_wal_lsn_diff(%(lsn)s::pg_lsn, pg_last_wal_replay_lsn())::bigint AS behind_bytes,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS since_replay_seconds,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused;
