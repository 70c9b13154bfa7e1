-- Dead letters: jobs that will not run again by themselves, with their reason.
--   Killed: failed permanently (input the provider rejects, a payload of the wrong shape).
--   Failed with attempts >= max_attempts: retryable errors that never cleared.
-- `embed-worker retry-failed` puts them back; `embed-worker status` lists the latest.
-- A job's payload as JSON, or NULL when it is not (views must not fail on one bad job).
CREATE OR REPLACE FUNCTION embed_worker.job_payload(job bytea) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN convert_from(job, 'UTF8')::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
GRANT EXECUTE ON FUNCTION embed_worker.job_payload(bytea) TO embed_worker;

CREATE OR REPLACE VIEW embed_worker.failed_jobs AS
SELECT j.id,
       j.job_type AS queue,
       embed_worker.job_payload(j.job) ->> 'source_type' AS source_type,
       embed_worker.job_payload(j.job) ->> 'source_id' AS source_id,
       j.status,
       j.attempts,
       j.max_attempts,
       coalesce(j.last_result ->> 'Err', j.last_result::text) AS last_error,
       coalesce(j.done_at, j.lock_at, j.run_at) AS failed_at
  FROM apalis.jobs j
 WHERE j.status = 'Killed'
    OR (j.status = 'Failed' AND j.attempts >= j.max_attempts);

GRANT SELECT ON embed_worker.failed_jobs TO embed_worker;

-- The jobs view must not fail on a payload that is not JSON (a bad job is reported, not fatal).
CREATE OR REPLACE VIEW embed_worker.jobs AS
SELECT j.id, j.job_type AS queue, j.status, j.attempts, j.max_attempts, j.run_at, j.lock_by,
       j.lock_at, j.done_at, j.last_result,
       embed_worker.job_payload(j.job) ->> 'source_type' AS source_type,
       embed_worker.job_payload(j.job) ->> 'source_id' AS source_id
  FROM apalis.jobs j;

-- A payload that is not JSON cannot be decoded by apalis's JsonCodec, and apalis-postgres 1.0
-- then fails the whole poll (the worker restarts and meets the same job again: a poison-pill
-- loop). Such a job is recorded as a dead letter at insert, with its reason, and never claimed.
-- (JSON of the wrong shape is decoded fine and failed by the worker with its reason.)
CREATE OR REPLACE FUNCTION embed_worker.quarantine_unreadable_job() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF embed_worker.job_payload(NEW.job) IS NULL THEN
        NEW.status := 'Killed';
        NEW.done_at := now();
        NEW.last_result := jsonb_build_object('Err', 'unreadable job payload: not UTF-8 JSON');
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS embed_worker_quarantine_unreadable ON apalis.jobs;
CREATE TRIGGER embed_worker_quarantine_unreadable
    BEFORE INSERT ON apalis.jobs
    FOR EACH ROW EXECUTE FUNCTION embed_worker.quarantine_unreadable_job();
