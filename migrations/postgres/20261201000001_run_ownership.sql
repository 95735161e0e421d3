-- `owner`: the process execution driving the run. Every checkpoint matches it, so a process
-- that lost its target lock (and whose run another process has since claimed) cannot write the
-- run any more (fencing).
-- `needs_recovery`: the sealed state is still needed: the run is unfinished, or its rollback
-- failed and must be retried. No new run starts on its targets until it is cleared.
ALTER TABLE rotator_runs ADD COLUMN owner TEXT;
ALTER TABLE rotator_runs ADD COLUMN needs_recovery INTEGER NOT NULL DEFAULT 0;
UPDATE rotator_runs SET needs_recovery = 1 WHERE outcome IS NULL;
CREATE INDEX rotator_runs_needs_recovery ON rotator_runs (needs_recovery);
