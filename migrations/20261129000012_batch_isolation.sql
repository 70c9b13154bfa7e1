-- The bulk lane isolated per batch (hardening, round 2). Before, one bad batch (an output file
-- that answers 404, a create refused, a batch object the client cannot read) failed every lane
-- round at that batch and the lane stopped for good.
--
-- failures   consecutive rounds in which an operation on this batch failed transiently (the
--            provider unreachable, a 5xx); at 5 the batch is ended with its last error. A
--            permanent error (4xx, an unreadable answer) ends it at once.
-- resubmits  times a batch the provider failed for a transient reason (its enqueued-token
--            limit) was created again from the same file, at most 3, no job attempt used.
-- retry_at   not before this time is it created again.
-- abandoned  ended by the operator (`embed-worker batches abandon ID`), whatever the provider says.
ALTER TABLE embed_worker.batches
    ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS resubmits integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS retry_at timestamptz;
ALTER TABLE embed_worker.batches DROP CONSTRAINT IF EXISTS batches_state_check;
ALTER TABLE embed_worker.batches ADD CONSTRAINT batches_state_check
    CHECK (state IN ('preparing', 'submitted', 'completed', 'expired', 'failed', 'cancelled', 'abandoned'));
