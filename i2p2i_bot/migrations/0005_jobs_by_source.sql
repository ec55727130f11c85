-- /forget keeps an uploaded source file while another member's job still names it: find those jobs by hash.
CREATE INDEX jobs_source ON jobs (source_sha256) WHERE source_sha256 IS NOT NULL;
