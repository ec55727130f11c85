-- Delete on a job's result hides the job: /history and /job then show it to admins only. The row keeps the
-- prompt, settings, seeds and image hashes for them (the image files are removed); /forget deletes it with
-- the rest. Both NULL while the job is visible; hidden_by is who pressed Delete (its owner or an admin).
ALTER TABLE jobs ADD COLUMN hidden_at REAL;
ALTER TABLE jobs ADD COLUMN hidden_by INTEGER;
