-- What a job does with images the safety checker flags (i2p2i_bot/flagged.py), fixed when it is submitted
-- from the server's nsfw setting and its channel: withhold (blacked out before they are stored, never
-- posted), spoiler or show (kept as made, posted so only in an age-restricted channel). Jobs from before
-- this column withheld them.
ALTER TABLE jobs ADD COLUMN flagged_policy TEXT NOT NULL DEFAULT 'withhold'
    CHECK (flagged_policy IN ('withhold', 'spoiler', 'show'));
