-- Whether a computer has a network (a create may ask for none): 1 for every computer made
-- before the choice existed, which had no card and now gets one at its next start.
ALTER TABLE computers ADD COLUMN network BIGINT NOT NULL DEFAULT 1;
