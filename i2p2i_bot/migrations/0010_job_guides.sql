-- What a job's images keep of a source image besides the prompt (i2p2i_bot/guides.py): a JSON list of
-- {"name", "weight"} in canonical order, '[]' for none; and the sha256 of the stored image they keep it of
-- (NULL without guides). /forget keeps a source file while another member's job still guides from it.
ALTER TABLE jobs ADD COLUMN keep TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN guide_source TEXT;
CREATE INDEX jobs_guide_source ON jobs (guide_source) WHERE guide_source IS NOT NULL;
