-- Why a finished job's result could not be posted anywhere (channel, job message, DM), in words for its
-- owner; NULL once it is delivered or while nothing has failed. Kept across restarts for /job and /history.
ALTER TABLE jobs ADD COLUMN delivery_error TEXT;
