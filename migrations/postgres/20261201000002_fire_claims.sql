-- One row per scheduled fire of a target that some `serve` replica took on: the primary key
-- lets exactly one replica claim a fire, whichever wakes first.
CREATE TABLE rotator_fires (
    target       TEXT NOT NULL,
    scheduled_at BIGINT NOT NULL,
    replica      TEXT NOT NULL,
    claimed_at   BIGINT NOT NULL,
    PRIMARY KEY (target, scheduled_at)
);
