-- A run's recoverable state, one sealed row per target (rotator_runs.state keeps the run's own
-- part: consumers, rollback flag, target order), so a checkpoint writes only what changed and
-- its cost does not grow with the number of targets.
CREATE TABLE rotator_run_parts (
    run_id TEXT NOT NULL REFERENCES rotator_runs (id) ON DELETE CASCADE,
    part   TEXT NOT NULL,
    state  BLOB NOT NULL,
    PRIMARY KEY (run_id, part)
);
