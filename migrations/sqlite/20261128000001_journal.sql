-- One row per rotation run; `state` is the run's recoverable state, AES-256-GCM encrypted
-- (it holds the old and new passwords), so a journal dump leaks nothing.
CREATE TABLE rotator_runs (
    id           TEXT PRIMARY KEY,
    trigger_kind TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    outcome      TEXT,
    state        BLOB NOT NULL
);

CREATE INDEX rotator_runs_started ON rotator_runs (started_at);

CREATE TABLE rotator_run_targets (
    run_id TEXT NOT NULL REFERENCES rotator_runs (id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    PRIMARY KEY (run_id, target)
);

CREATE INDEX rotator_run_targets_target ON rotator_run_targets (target);

-- What happened, step by step, in plain text: safe to read, never holds a secret.
CREATE TABLE rotator_steps (
    run_id      TEXT NOT NULL REFERENCES rotator_runs (id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    step        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    status      TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    duration_ms BIGINT,
    error       TEXT,
    PRIMARY KEY (run_id, seq)
);
