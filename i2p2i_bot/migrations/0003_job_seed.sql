-- A job's request fields each have a column of the same name (i2p2i_bot/request.py); the first seed joins
-- them. Image i's seed is seed + i (mod 2**32), which the seeds list has always spelt out.
ALTER TABLE jobs ADD COLUMN seed INTEGER;
UPDATE jobs SET seed = json_extract(seeds, '$[0]');
