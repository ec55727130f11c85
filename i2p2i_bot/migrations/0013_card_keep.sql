-- What a member chose to keep of a card's image besides the prompt (its "Keep from the image" select and
-- Guide weights): a JSON list of {"name", "weight"} in canonical order, as jobs.keep; '[]': the prompt only.
ALTER TABLE cards ADD COLUMN keep TEXT NOT NULL DEFAULT '[]';
