-- The language of what the whole channel reads of a job (its status message and result) and of a describe
-- (its placeholder, answered after a restart), fixed when asked (i2p2i_bot/replies.py, channel_locale):
-- the server's, or in a direct message the member's own. Rows from before these columns read English.
ALTER TABLE jobs ADD COLUMN locale TEXT;
ALTER TABLE pending_describes ADD COLUMN locale TEXT;
