-- Whether a job is an upscale (Upscale (2×) on a result: twice its source image's size, kept from it with
-- layout), so its sides are checked against generate.upscale_max_side rather than max_side when Reroll,
-- Retry or Edit plans it again. Every job made before was none.
ALTER TABLE jobs ADD COLUMN upscale INTEGER NOT NULL DEFAULT 0;
