-- Set once the claiming replica has decided a fire (started its run, or skipped it). A claim
-- left unsettled past the takeover grace, with no run started since its fire, belongs to a
-- replica that died in between: another replica takes the fire over.
ALTER TABLE rotator_fires ADD COLUMN settled INTEGER NOT NULL DEFAULT 0;
