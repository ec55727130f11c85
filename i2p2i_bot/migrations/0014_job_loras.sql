-- The LoRAs a job's prompt named (i2p2i_bot/loras.py): a JSON list of {"name", "weight", "sha256"} in the
-- prompt's order, '[]' for none. The hashes let Info and Reroll reproduce the job, and refuse a file that
-- changed since.
ALTER TABLE jobs ADD COLUMN loras TEXT NOT NULL DEFAULT '[]';
